"""Where each CoOp dataset comes from and how its files become the CoOp layout (`clipadapt data prepare`).

One `Source` per dataset of `readers.DATASETS`: the files to download (official URLs, tried in
order, then the CoOp split json from the Google Drive file CoOp's DATASETS.md links), each file's
checksum where one is published, and how it is arranged: a plain file is put at `dest`, an archive
is unpacked and `moves` take paths out of it into the dataset folder (`""` = the folder itself).

Honesty about checksums: the md5 sums here are the ones torchvision (0.21, `torchvision/datasets/*.py`)
records for the same files; no sha256 is published for any of these archives, and for the rest
(CoOp's split files on Google Drive, FGVC-Aircraft, UCF101's mid-frames, the ImageNet variants)
none is known here, so they are checked by structure instead: `prepare` ends with `data check`,
which reads the split files, finds every listed image and decodes it. The URLs were taken from
CoOp's DATASETS.md and torchvision, offline; several of CoOp's have moved (noted per file) and
StanfordCars' official files have been offline since 2023. A link that fails ends in a one-line
error with the manual step; `--mirror URL` fetches `URL/<dataset folder>/<file name>` instead.
"""

from dataclasses import dataclass

__all__ = ["SOURCES", "Download", "Source", "drive", "drive_view"]


def drive(file_id: str) -> str:
    """A direct download URL of a Google Drive file (confirm=t skips the large-file warning page)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def drive_view(file_id: str) -> str:
    """The Google Drive link as CoOp's DATASETS.md gives it (for manual steps)."""
    return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


@dataclass(frozen=True)
class Download:
    """One file: where to get it, how to check it, where it goes in the dataset folder."""

    name: str  # file name in the downloads folder (and on a --mirror)
    urls: tuple[str, ...]  # tried in order
    checksum: str | None = None  # "md5:<hex>" / "sha256:<hex>"; None: checked by structure (data check)
    dest: str | None = None  # a plain file: its path in the dataset folder (None: an archive to unpack)
    moves: tuple[tuple[str, str], ...] = ()  # archive: (path inside it, path in the dataset folder; "" = the folder)
    inner: str | None = None  # archive: an archive inside it to unpack in turn (Caltech101's zip holds a tar.gz)
    note: str = ""


@dataclass(frozen=True)
class Source:
    """How to build one dataset folder; `manual` is printed where the images cannot be downloaded."""

    dataset: str
    files: tuple[Download, ...]
    manual: str = ""
    note: str = ""


TV = "checksum: torchvision 0.21"


def _split(coop_name: str, file_id: str) -> Download:
    name = f"split_zhou_{coop_name}.json"
    return Download(name, (drive(file_id),), dest=name, note=f"CoOp's split file ({drive_view(file_id)})")


CLASSNAMES_ID = "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"  # CoOp's ImageNet classnames.txt (from CLIP's notebook)
CLASSNAMES = Download(
    "classnames.txt", (drive(CLASSNAMES_ID),), dest="classnames.txt", note=f"CoOp ({drive_view(CLASSNAMES_ID)})"
)
VGG = "https://www.robots.ox.ac.uk/~vgg/data"

IMAGENET_MANUAL = """\
ImageNet's images are licence-gated and cannot be downloaded for you:
  1. sign in at https://image-net.org and download ILSVRC2012_img_train.tar (138 GB, md5
     1d675b47d978889d74fa0da5fadfb00e) and ILSVRC2012_img_val.tar (6.3 GB, md5 29b22e2961454d5413ddabcf34fc5622)
     from https://image-net.org/challenges/LSVRC/2012/2012-downloads.php
  2. mkdir -p {folder}/images/train {folder}/images/val
     tar -xf ILSVRC2012_img_train.tar -C {folder}/images/train
     cd {folder}/images/train && for f in *.tar; do mkdir "${{f%.tar}}" && tar -xf "$f" -C "${{f%.tar}}" && rm "$f"; done
  3. tar -xf ILSVRC2012_img_val.tar -C {folder}/images/val, then sort the 50,000 val images into their
     1,000 wnid folders (e.g. with valprep.sh of github.com/soumith/imagenetloader.torch, run inside images/val)
  (or link existing train/ and val/ wnid folders: ln -s /path/to/train {folder}/images/train)
  4. run `clipadapt data prepare imagenet --root {root}` again: it checks the folders and adds classnames.txt"""

SOURCES: dict[str, Source] = {
    s.dataset: s
    for s in (
        Source("imagenet", (CLASSNAMES,), manual=IMAGENET_MANUAL),
        Source(
            "caltech101",
            (
                Download(
                    "caltech-101.zip",
                    ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
                    "md5:3138e1922a9193bfa496528edbbc45d0",
                    inner="caltech-101/101_ObjectCategories.tar.gz",
                    moves=(("101_ObjectCategories", "101_ObjectCategories"),),
                    note=f"{TV}; CoOp's vision.caltech.edu link has moved to data.caltech.edu",
                ),
                _split("Caltech101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
            ),
        ),
        Source(
            "oxford_pets",
            (
                Download(
                    "images.tar.gz",
                    (f"{VGG}/pets/data/images.tar.gz",),
                    "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",
                    moves=(("images", "images"),),
                    note=TV,
                ),
                Download(
                    "annotations.tar.gz",
                    (f"{VGG}/pets/data/annotations.tar.gz",),
                    "md5:95a8c909bbe2e81eed6a22bccdf3f68f",
                    moves=(("annotations", "annotations"),),
                    note=TV,
                ),
                _split("OxfordPets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
            ),
        ),
        Source(
            "stanford_cars",
            (
                Download(
                    "cars_train.tgz",
                    ("http://ai.stanford.edu/~jkrause/car196/cars_train.tgz",),
                    moves=(("cars_train", "cars_train"),),
                ),
                Download(
                    "cars_test.tgz",
                    ("http://ai.stanford.edu/~jkrause/car196/cars_test.tgz",),
                    moves=(("cars_test", "cars_test"),),
                ),
                Download(
                    "car_devkit.tgz",
                    ("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz",),
                    moves=(("devkit", "devkit"),),
                ),
                Download(
                    "cars_test_annos_withlabels.mat",
                    ("http://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat",),
                    dest="cars_test_annos_withlabels.mat",
                ),
                _split("StanfordCars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
            ),
            note="the official Stanford files have been offline since 2023 (torchvision says so too): put the "
            "four files from a copy you trust into the downloads folder, or serve them with --mirror",
        ),
        Source(
            "oxford_flowers",
            (
                Download(
                    "102flowers.tgz",
                    (f"{VGG}/flowers/102/102flowers.tgz",),
                    "md5:52808999861908f626f3c1f4e79d11fa",
                    moves=(("jpg", "jpg"),),
                    note=TV,
                ),
                Download(
                    "imagelabels.mat",
                    (f"{VGG}/flowers/102/imagelabels.mat",),
                    "md5:e0620be6f572b9609742df49c70aed4d",
                    dest="imagelabels.mat",
                    note=TV,
                ),
                Download(
                    "cat_to_name.json",
                    (drive("1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"),),
                    dest="cat_to_name.json",
                    note=f"CoOp ({drive_view('1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0')})",
                ),
                _split("OxfordFlowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
            ),
        ),
        Source(
            "food101",
            (
                Download(
                    "food-101.tar.gz",
                    ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",),
                    "md5:85eeb15f3717b99a5da872d97d918f87",
                    moves=(("food-101", ""),),
                    note=TV,
                ),
                _split("Food101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
            ),
        ),
        Source(
            "fgvc_aircraft",
            (
                Download(
                    "fgvc-aircraft-2013b.tar.gz",
                    (f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",),
                    moves=(("fgvc-aircraft-2013b/data", ""),),
                    note="no published checksum; its own variants.txt and images_variant_*.txt are the split",
                ),
            ),
        ),
        Source(
            "sun397",
            (
                Download(
                    "SUN397.tar.gz",
                    ("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",),
                    "md5:8ca2778205c41d23104230ba66911c7a",
                    moves=(("SUN397", "SUN397"),),
                    note=f"{TV}; CoOp's Partitions.zip is not fetched: the split json replaces it",
                ),
                _split("SUN397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
            ),
        ),
        Source(
            "dtd",
            (
                Download(
                    "dtd-r1.0.1.tar.gz",
                    (f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz",),
                    "md5:fff73e5086ae6bdbea199a49dfb8a4c1",
                    moves=(("dtd", ""),),
                    note=TV,
                ),
                _split("DescribableTextures", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
            ),
        ),
        Source(
            "eurosat",
            (
                Download(
                    "EuroSAT.zip",
                    (
                        "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                        "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                    ),
                    "md5:c8fa014336c82ac7804f0398fcb19387",
                    moves=(("2750", "2750"),),
                    note=f"{TV}, of TorchGeo's copy; CoOp's madm.dfki.de link is offline",
                ),
                _split("EuroSAT", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
            ),
        ),
        Source(
            "ucf101",
            (
                Download(
                    "UCF-101-midframes.zip",
                    (drive("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),),
                    moves=(("UCF-101-midframes", "UCF-101-midframes"),),
                    note=f"CoOp's middle frames ({drive_view('10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O')})",
                ),
                _split("UCF101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
            ),
        ),
        Source(
            "imagenet_v2",
            (
                Download(
                    "imagenetv2-matched-frequency.tar.gz",
                    (
                        "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                        "imagenetv2-matched-frequency.tar.gz",
                        "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz",
                    ),
                    moves=(("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),),
                    note="the ImageNetV2 authors' Hugging Face copy, then CoOp's S3 link",
                ),
                CLASSNAMES,
            ),
        ),
        Source(
            "imagenet_sketch",
            (
                Download(
                    "ImageNet-Sketch.zip",
                    ("https://huggingface.co/datasets/songweig/imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip",),
                    moves=(("sketch", "images"),),
                    note="the authors' Hugging Face copy (github.com/HaohanWang/ImageNet-Sketch); its sketch/ "
                    "folder becomes images/",
                ),
                CLASSNAMES,
            ),
        ),
        Source(
            "imagenet_a",
            (
                Download(
                    "imagenet-a.tar",
                    ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",),
                    moves=(("imagenet-a", "imagenet-a"),),
                    note="github.com/hendrycks/natural-adv-examples",
                ),
                CLASSNAMES,
            ),
        ),
        Source(
            "imagenet_r",
            (
                Download(
                    "imagenet-r.tar",
                    ("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",),
                    moves=(("imagenet-r", "imagenet-r"),),
                    note="github.com/hendrycks/imagenet-r",
                ),
                CLASSNAMES,
            ),
        ),
    )
}
