"""CLIPDataModule: read a CoOp-layout dataset -> few-shot draw -> base/novel subsample -> transforms -> loaders.

The training classes (`classnames`), the dataset's template (`templates`) and the evaluation sets
(`eval_sets`) are available right after `__init__`, because the CLI links them into the model when
it instantiates it. Evaluation loaders use `UnpaddedDistributedSampler`, so under DDP every test
image is counted exactly once (the stock DistributedSampler pads with duplicates).

The class list is the split file's as a whole (every label of train, val and test, names by label),
never only the labels the few-shot train split holds: a class with no train image keeps its label
and name, `test` scores it, and `fit` refuses to start (naming the class and the split file) rather
than train a head row it never sees. Before training, `fit` also opens every test file (a header
parse, no decode, in parallel), so a corrupt test image ends the run before training, not after it.
Deviation: Dassl takes the classes from the train split; the same list whenever every class has a
train image, which holds for all CoOp datasets.

Exact resume (issue 10 §5): what a training step sees is a pure function of (train seed, epoch,
index). `EpochSampler` draws each epoch's order from its own generator seeded by (seed, epoch) and
hands each index on as an `ItemKey`; `ImageList` runs the augmentation of that item under the global
RNG seeded by the key (inside `torch.random.fork_rng`, so nothing outside sees it). So a run killed
and resumed from `last.ckpt` (Lightning restores the epoch and calls `set_epoch`) sees the same
batches, with any `num_workers` (the key travels with the index, not in a worker's state; the sampler
starts at the resumed epoch, kept in checkpoints, as workers fetch before Lightning's `set_epoch`) and under
DDP (each rank takes its shard of the same order, padded as DistributedSampler pads). The train seed
is the run's global seed (`seed_everything`, which the CLI sets from `data.seed`), else `data.seed`,
and travels in checkpoints (`state_dict`). Deviation: Dassl shuffles with the global RNG; the draws
differ, their distribution does not.

`image_size` (None) follows the backbone: `setup` reads it from the trainer's model, and an explicit
value that does not match the model is refused there, before the first step.
"""

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from clipadapt.data.fewshot import few_shot_splits, load_few_shot, read_dassl_cache, subsample_classes, subsample_labels
from clipadapt.data.images import find_unreadable, read_rgb
from clipadapt.data.own import OWN_DATA, split_origin
from clipadapt.data.readers import Datum, class_names, dataset_dir, read_splits, resolve_dataset, split_source
from clipadapt.data.synthetic import write_synthetic
from clipadapt.data.templates import templates_for
from clipadapt.errors import ClipAdaptError
from clipadapt.toy.world import DOMAINS as TOY_DOMAINS
from clipadapt.toy.world import write_toy

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPDataModule",
    "DecodedImages",
    "EpochSampler",
    "EvalSet",
    "ImageList",
    "ItemKey",
    "StepChunks",
    "UnpaddedDistributedSampler",
    "summarize_dataset",
]

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUBSET_ENTRIES = {"all": "all", "base": "base", "novel": "novel", "new": "novel"}


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: log name (`test/<name>/acc`), prompt-ready classnames, its templates, its dataset."""

    name: str
    classnames: list[str]
    templates: list[str]
    dataset: str


class ItemKey(NamedTuple):
    """An item of one epoch of one run: its augmentation is a function of these three numbers only."""

    seed: int
    epoch: int
    index: int


def stream_seed(*numbers: int) -> int:
    """A 63-bit seed that mixes `numbers` (a hash: (1, 2) and (2, 1) or (seed, epoch + 1) do not collide)."""
    digest = hashlib.blake2b(",".join(map(str, numbers)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_torch(seed: int) -> None:
    """`torch.manual_seed(seed)`, minus its cost on a machine whose accelerators are not in use.

    Where CUDA (or XPU, MTIA) is built in but not initialised, `torch.manual_seed` queues a lazy seed for
    each and formats the caller's stack for it: ~0.5 ms under Lightning's deep stacks, more than a small
    model's whole step. The CPU generator gets the same seed either way, so the draws are identical.
    """
    devices = torch.cuda.is_initialized() or torch.backends.mps.is_available()
    devices = devices or (hasattr(torch, "xpu") and torch.xpu.is_initialized())
    if devices:
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


class DecodedImages:
    """Decoded uint8 (3, H, W) images of a list of files, read once (threads) until `budget_mb` is held.

    Filled in the main process when the loader is made, so DataLoader workers share the tensors
    (fork, copy-on-write) instead of each decoding its own copy; files past the budget stay on disk.
    """

    def __init__(self, paths: Sequence[str], budget_mb: float, split: str = "train") -> None:
        self.images: dict[int, Tensor] = {}
        budget, held = budget_mb * 2**20, 0
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
            for index, image in enumerate(pool.map(lambda path: decoded(path, split), paths)):
                if held + image.numel() > budget:
                    break
                self.images[index] = image
                held += image.numel()
        self.megabytes = held / 2**20

    def get(self, index: int) -> Tensor | None:
        """The decoded image `index`, or None if it is not held."""
        return self.images.get(index)


def decoded(path: str, split: str) -> Tensor:
    """The file as a uint8 (3, H, W) RGB tensor; ImageReadError if it cannot be read."""
    return pil_to_tensor(read_rgb(path, split))


class ImageList(Dataset):
    """(image, label) pairs from a list of `Datum`; an unreadable file raises `ImageReadError` naming it and `split`.

    Indexed by an int (evaluation), or by an `ItemKey` (training, from `EpochSampler`): the transform then
    runs under the global RNG seeded by the key, restored afterwards. With `memory` (`DecodedImages`),
    `transform` takes uint8 tensors: held images skip the decode.
    """

    def __init__(
        self, items: Sequence[Datum], transform: T.Compose, split: str = "train", memory: DecodedImages | None = None
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.split = split
        self.memory = memory

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | ItemKey) -> tuple[Tensor, int]:
        index = key.index if isinstance(key, ItemKey) else key
        path, label, _ = self.items[index]
        held = self.memory.get(index) if self.memory is not None else None
        if held is not None:
            image = held
        else:
            image = decoded(path, self.split) if self.memory is not None else read_rgb(path, self.split)
        if not isinstance(key, ItemKey):
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global RNG
            torch.random.default_generator.manual_seed(stream_seed(*key))  # the CPU RNG is the one forked
            return self.transform(image), label


class EpochSampler(DistributedSampler):
    """Training order drawn from (seed, epoch) alone; yields `ItemKey`s, rank r takes every W-th of the order.

    A DistributedSampler subclass, so Lightning keeps it under DDP (and calls `set_epoch` every epoch,
    also on resume). The order is padded to a multiple of the world size as DistributedSampler pads.
    Without an initialised process group it is one shard: the whole order.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def order(self) -> list[int]:
        """This epoch's permutation of the whole dataset (every rank draws the same one)."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
        return torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[ItemKey]:
        order = self.order()
        order = (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size]
        return iter(ItemKey(self.seed, self.epoch, i) for i in order[self.rank : self.total_size : self.num_replicas])


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r gets indices r, r + W, r + 2W, ... with no padding, so each item is seen exactly once.

    A DistributedSampler subclass, so Lightning keeps it instead of inserting its own (padding) one.
    Without an initialised process group it is plain sequential order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class StepChunks(Sampler[list[int]]):
    """`steps` consecutive batches of `batches` joined into one loader batch: the same indices in the same order.

    For a method that takes several optimizer steps per loader batch (RAda EFT encodes a chunk of
    training images in one frozen forward, then steps per batch): only a last partial *step* batch is
    dropped (as `batches` says), never a partial chunk.
    """

    def __init__(self, batches: BatchSampler, steps: int) -> None:
        self.batches = batches
        self.steps = steps
        self.sampler = batches.sampler  # where Lightning looks for `set_epoch` (a batch sampler's `.sampler`)

    @property
    def num_steps(self) -> int:
        """Optimizer steps per epoch: the step batches."""
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        chunk: list[int] = []
        for count, batch in enumerate(self.batches, 1):
            chunk += batch
            if count % self.steps == 0:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.steps)


def build_transform(
    image_size: int, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True
) -> T.Compose:
    """Dassl/CoOp transforms: train RandomResizedCrop (+ flip), test Resize + CenterCrop; bicubic, CLIP normalisation."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps: list = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=bicubic)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def build_tensor_transform(
    image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, train: bool = True
) -> v2.Compose:
    """`build_transform(train)` on uint8 (3, H, W) tensors (torchvision v2): the same random draws, bicubic.

    The crop box and the flip come from the same torch RNG calls as the PIL pipeline; the resampling is
    torch's antialiased bicubic instead of PIL's, so pixels differ by rounding (a few levels of 255).
    """
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps: list = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=bicubic, antialias=True)]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


def prompt_names(names: Sequence[str]) -> list[str]:
    """Classnames as prompts use them (CoOp: underscores become spaces)."""
    return [name.replace("_", " ") for name in names]


class CLIPDataModule(L.LightningDataModule):
    """Few-shot CoOp-protocol data: train/val from the k-shot draw, one test loader per evaluation set."""

    def __init__(
        self,
        root: str = "data",
        dataset: str = "oxford_pets",
        num_shots: int = 16,
        seed: int = 1,
        subsample: str = "all",
        eval_sets: list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        num_workers: int = 4,
        image_size: int | None = None,
        train_crop_scale: tuple[float, float] = (0.08, 1.0),
        train_flip: bool = True,
        train_augment: bool = True,
        cache_dir: str | None = None,
        feature_cache: str | None = None,
        memory_cache_mb: float = 0,
    ) -> None:
        """
        Args:
            root: folder that holds the dataset folders (CoOp's $DATA).
            dataset: snake-case or CoOp name (`oxford_pets`, `OxfordPets`, ...); `synthetic` and the toy
                world's domains (`toy`, `toy_dusk`, ...) are written if missing.
            num_shots: images per class drawn for train (val gets min(k, 4)); <= 0 uses the full splits.
            seed: seed of the few-shot draw (Dassl-exact; the protocol uses 1, 2, 3).
            subsample: training classes: all | base | novel (first / second half of the sorted labels).
            eval_sets: test sets: all | base | novel of this dataset, or other dataset names (cross-dataset,
                ImageNet OOD: imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r). Default: [subsample].
            batch_size: training batch size.
            eval_batch_size: batch size of the val and test loaders.
            num_workers: data loader worker processes.
            image_size: crop size; None follows the backbone (224 for ViT-B/16, 32 for the tiny test model);
                a value the model does not take is refused at setup.
            train_crop_scale: RandomResizedCrop scale range (Dassl (0.08, 1); CLIP-AST (0.5, 1)).
            train_flip: random horizontal flip in training (off for CLIP-CITE).
            train_augment: False: the train split goes through the evaluation transform (Resize + CenterCrop,
                as CoOp's linear-probe protocol extracts its features), so `train_crop_scale` and `train_flip`
                are ignored, and every epoch sees the same pixels. Then a method whose plain image tower is
                frozen (linear probe, CLIP-Adapter, Tip-Adapter(-F), RAda EFT, CoOp, KgCoOp, CoCoOp, PromptSRC's
                teacher) encodes the train split once per run (or per sweep, with `feature_cache`) instead of every step
                (`AdaptationModule.image_features`), and Tip-Adapter's cache is that one pass.
            cache_dir: where few-shot draws are recorded (default ~/.cache/clipadapt/fewshot).
            feature_cache: a folder for the frozen image tower's features of whole evaluation sets, shared by
                the runs of a sweep (keyed by weights, transform and files: `clipadapt.features`); off by default.
            memory_cache_mb: decode the training images once and hold them as uint8 tensors, up to this many
                MB (0: off, every epoch decodes every file); augmentation then runs on tensors (torchvision v2).
        """
        super().__init__()
        self.save_hyperparameters()
        _check_numbers(seed=seed, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.info = resolve_dataset(dataset)
        if subsample not in SUBSET_ENTRIES:
            raise ValueError(f"subsample must be one of all, base, novel, got {subsample!r}")
        self.root = root
        self.dataset = self.info.name
        self.num_shots = num_shots
        self.seed = seed
        self.subsample = SUBSET_ENTRIES[subsample]
        self.eval_set_names = list(eval_sets) if eval_sets is not None else [self.subsample]
        for entry in self.eval_set_names:
            if entry not in SUBSET_ENTRIES:
                resolve_dataset(entry)  # fail now on a typo, not after training
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.train_crop_scale = train_crop_scale
        self.train_flip = train_flip
        self.train_augment = train_augment
        self.cache_dir = cache_dir
        self.train_seed: int | None = None  # the run's seed, fixed at the first training loader (state_dict)
        self._start_epoch = 0  # the epoch a resumed fit starts at (state_dict)
        self.feature_cache = feature_cache
        if memory_cache_mb < 0:
            raise ValueError(f"data.memory_cache_mb must be 0 (off) or more, got {memory_cache_mb}")
        self.memory_cache_mb = memory_cache_mb
        self._memory: DecodedImages | None = None
        self._data: dict | None = None
        self._eval: list[tuple[EvalSet, list[Datum]]] | None = None
        # Optimizer steps per training loader batch; a method that encodes chunks of steps sets it in its
        # `setup("fit")` (`AdaptationModule(feature_chunk=k)`), before the trainer asks for the loader.
        self.steps_per_batch = 1

    # ---- what the model needs at instantiation (lazy, cached) ----

    @property
    def classnames(self) -> list[str]:
        """Training classes after subsampling, prompt-ready, indexed by training label."""
        return list(self._load()["classnames"])

    @property
    def templates(self) -> list[str]:
        """The dataset's own CoOp template(s)."""
        return templates_for("dataset", self.dataset)

    @property
    def num_classes(self) -> int:
        """Number of training classes."""
        return len(self._load()["classnames"])

    @property
    def eval_sets(self) -> list[EvalSet]:
        """The evaluation sets, in the order of `test_dataloader()`."""
        return [eval_set for eval_set, _ in self._load_eval()]

    # ---- reading ----

    def prepare_data(self) -> None:
        """Write the synthetic dataset if it is the one asked for and is missing."""
        self._ensure_synthetic()

    def setup(self, stage: str | None = None) -> None:
        """Read splits and draw the few-shot subsets (cached; also done lazily by the properties); check before fit."""
        self._follow_model()
        self._load()
        if stage == "fit":
            self._check_fit()
        if stage in (None, "test", "predict"):
            self._load_eval()

    def _follow_model(self) -> None:
        """`image_size` from the trainer's model (None: take it; another value: refuse now, not at the first step)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        size = getattr(getattr(model, "clip", None), "image_size", None)
        if size is None:
            return
        if self.image_size is None:
            self.image_size = size
        elif self.image_size != size:
            arch = model.hparams.get("arch", type(model).__name__)
            raise ClipAdaptError(
                f"data.image_size={self.image_size} but {arch} takes {size} px images: drop data.image_size "
                f"(it follows the model) or set it to {size}"
            )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to draw the same batches: the train seed and the epoch it resumes at."""
        return {"train_seed": self._train_seed(), "next_epoch": self._epochs_done()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict()` (Lightning calls it when a fit resumes from a checkpoint)."""
        if state_dict.get("train_seed") is not None:
            self.train_seed = int(state_dict["train_seed"])
        self._start_epoch = int(state_dict.get("next_epoch", 0))

    def _epochs_done(self) -> int:
        """Training epochs finished so far (what Lightning's set_epoch gives the sampler next); 0 outside a fit."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def _train_seed(self) -> int:
        if self.train_seed is None:
            self.train_seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))  # seed_everything's, else data.seed
        return self.train_seed

    def _ensure_synthetic(self) -> None:
        if self.dataset == "synthetic" and not dataset_dir(self.root, self.dataset).exists():
            path = write_synthetic(self.root, self.dataset)
            log.info("wrote the synthetic demo dataset to %s", path)
        for name in {self.dataset, *self.eval_set_names} & set(TOY_DOMAINS):
            if not dataset_dir(self.root, name).exists():
                log.info("wrote the toy domain %s to %s", name, write_toy(self.root, name))

    def _load(self) -> dict:
        if self._data is not None:
            return self._data
        self._ensure_synthetic()
        splits = read_splits(self.root, self.dataset)
        if not splits["train"]:
            raise ValueError(
                f"{self.info.display} is test-only (an OOD evaluation set); train on imagenet and list "
                f"{self.dataset} in data.eval_sets"
            )
        # Every label of train, val and test: a class with no train image keeps its label and name.
        names = class_names(splits)
        folder = dataset_dir(self.root, self.dataset)
        train, val = load_few_shot(
            splits["train"], splits["val"], self.num_shots, self.seed, folder, self.dataset, self.cache_dir
        )
        # Dassl subsamples after the draw; base/novel are halves of the whole class list (Dassl: of the labels in
        # the few-shot train split, the same list whenever every class has a train image).
        few = {"train": train, "val": val, "test": splits["test"]}
        labels = range(len(names))
        kept = subsample_labels(labels, self.subsample)
        chosen = subsample_classes(few, self.subsample, labels)
        self._data = {
            "few": few,
            "train": chosen["train"],
            "val": chosen["val"],
            "names": names,
            "classnames": prompt_names([names[label] for label in kept]),
        }
        return self._data

    def _load_eval(self) -> list[tuple[EvalSet, list[Datum]]]:
        if self._eval is not None:
            return self._eval
        data = self._load()
        sets = []
        for entry in self.eval_set_names:
            if entry in SUBSET_ENTRIES:
                mode = SUBSET_ENTRIES[entry]
                # The base/novel classes are halves of the whole class list, whatever the training subsample is.
                labels = range(len(data["names"]))
                test = subsample_classes({"test": data["few"]["test"]}, mode, labels)["test"]
                names = prompt_names([data["names"][label] for label in subsample_labels(labels, mode)])
                name = self.dataset if mode == "all" else mode
                sets.append((EvalSet(name, names, self.templates, self.dataset), test))
            else:
                info = resolve_dataset(entry)
                splits = read_splits(self.root, info.name)
                if not splits["test"]:
                    raise ValueError(f"evaluation set {entry!r}: {info.display} has no test images")
                templates = templates_for("dataset", info.name)
                sets.append(
                    (EvalSet(info.name, prompt_names(class_names(splits)), templates, info.name), splits["test"])
                )
        seen = [eval_set.name for eval_set, _ in sets]
        if len(set(seen)) != len(seen):
            raise ValueError(f"eval_sets name the same set twice: {self.eval_set_names} -> {seen}")
        self._eval = sets
        return sets

    def _check_fit(self) -> None:
        """Refuse to train when a training class has no train image or a test image cannot be opened."""
        data = self._load()
        missing = sorted(set(range(len(data["classnames"]))) - {d.label for d in data["train"]})
        if missing:
            raise ClipAdaptError(
                f"{self.info.display}: {len(missing)} training class(es) have no image in the train split "
                f"({split_source(self.root, self.dataset, 'train')}): "
                f"{_first([repr(data['classnames'][label]) for label in missing])}; "
                "add train images for them, or evaluate without training (`clipadapt test`, e.g. zero-shot)"
            )
        # A header parse per file (not a decode) is cheap enough for 50k files, and catches the empty,
        # half-downloaded or non-image files that would otherwise end the run in the test after training.
        # Every DDP rank checks every file, so all ranks stop together.
        paths = list(dict.fromkeys(d.path for _, items in self._load_eval() for d in items))
        show = self.trainer is None or self.trainer.is_global_zero
        bad = find_unreadable(paths, decode=False, progress=show, desc="test files")
        if bad:
            raise ClipAdaptError(
                f"{len(bad)} of {len(paths)} test images cannot be opened, so the test after training would fail "
                f"(first: {_first([path for path, _ in bad], 3)}; {bad[0][1]}); "
                "replace them or remove them from the split "
                f"(`clipadapt data check --root {self.root} --dataset {self.dataset}` decodes and lists every one)"
            )

    # ---- loaders ----

    def _size(self) -> int:
        return self.image_size if self.image_size is not None else 224  # outside a Trainer: ViT-B/16's

    def _eval_loader(self, items: list[Datum], split: str) -> DataLoader:
        ds = ImageList(items, build_transform(self._size(), train=False), split)
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            sampler=UnpaddedDistributedSampler(ds),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled k-shot train split (`EpochSampler`); drop_last only when there is at least one full batch (Dassl)."""
        items = self._load()["train"]
        if self.memory_cache_mb > 0:
            if self._memory is None:  # decoded once per run, before any worker starts
                self._memory = DecodedImages([d.path for d in items], self.memory_cache_mb)
                log.info("memory cache: %d of %d training images decoded (%.0f MB)", len(self._memory.images),
                         len(items), self._memory.megabytes)  # fmt: skip
            transform = build_tensor_transform(self._size(), self.train_crop_scale, self.train_flip, self.train_augment)
            ds = ImageList(items, transform, memory=self._memory)
        else:
            transform = build_transform(self._size(), self.train_augment, self.train_crop_scale, self.train_flip)
            ds = ImageList(items, transform)
        sampler = EpochSampler(ds, self._train_seed())
        # Lightning builds the loader's iterator before its set_epoch, and workers fetch their first batches
        # then: the sampler must already be at the epoch about to run. On resume the trainer's loops are not
        # restored yet when the loader is built, so that epoch comes from the checkpoint (`state_dict`).
        sampler.set_epoch(max(self._start_epoch, self._epochs_done()))
        if self.steps_per_batch > 1:  # the same order, batched, then joined into chunks of steps
            steps = BatchSampler(sampler, self.batch_size, drop_last=len(ds) >= self.batch_size)
            return DataLoader(
                ds,
                batch_sampler=StepChunks(steps, self.steps_per_batch),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(ds) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """The few-shot val split ([] where the dataset has none, e.g. ImageNet)."""
        items = self._load()["val"]
        return self._eval_loader(items, "val") if items else []

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation set, in the order of `eval_sets`."""
        return [self._eval_loader(items, "test") for _, items in self._load_eval()]

    def predict_dataloader(self) -> DataLoader:
        """The first evaluation set."""
        return self._eval_loader(self._load_eval()[0][1], "test")


def _first(items: list[str], limit: int = 5) -> str:
    """The first `limit` items, comma-separated, with ", ..." when there are more."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _check_numbers(seed: int, batch_size: int, eval_batch_size: int, num_workers: int) -> None:
    """ValueError naming the first data flag no run can use (the CLI prints it as one line)."""
    if seed < 0:  # random.seed(-s) is random.seed(s): a negative seed would silently repeat another draw
        raise ValueError(f"data.seed must be 0 or more (the protocol uses 1, 2, 3), got {seed}")
    for flag, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"data.{flag} must be 1 or more (images per step and device), got {value}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be 0 (load in the main process) or more, got {num_workers}")


def summarize_dataset(
    root: str | os.PathLike,
    dataset: str,
    num_shots: int = 0,
    seed: int = 1,
    splits: dict[str, list[Datum]] | None = None,
) -> str:
    """A human report of a dataset on disk (`clipadapt data check`; `splits` if already read); raises clear errors."""
    info = resolve_dataset(dataset)
    splits = splits if splits is not None else read_splits(root, info.name)
    names = class_names(splits)
    folder = dataset_dir(root, info.name)
    shown = _first(prompt_names(names))
    lines = [
        f"dataset:  {info.display}",
        f"folder:   {folder}",
        f"split:    {split_origin(root, info.reader) if info.reader in OWN_DATA else Path(folder, info.split_file)}",
        f"classes:  {len(names)} ({shown})",
    ]
    lines += [f"{split + ':':9} {len(splits[split])} images" for split in ("train", "val", "test")]
    untrained = sorted(set(range(len(names))) - {d.label for d in splits["train"]}) if splits["train"] else []
    if untrained:
        shown = _first([repr(names[label]) for label in untrained])
        lines.append(f"note:     {len(untrained)} class(es) have no train image ({shown}): `fit` refuses them")
    if info.test_only:
        lines.append("usage:    test-only (evaluation set)")
    else:
        m = math.ceil(len(names) / 2)
        lines.append(f"base/novel classes: {m} / {len(names) - m}")
    if num_shots > 0 and splits["train"]:
        dassl = folder / "split_fewshot" / f"shot_{num_shots}-seed_{seed}.pkl"
        drawn = read_dassl_cache(dassl, folder, splits["train"], splits["val"]) if dassl.is_file() else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, val = drawn or few_shot_splits(splits["train"], splits["val"], num_shots, seed)
        source = f"from Dassl's cache {dassl}" if drawn else "drawn"
        lines.append(
            f"few-shot: {num_shots} shots (val {min(num_shots, 4)}), seed {seed}, {source}: "
            f"train {len(train)}, val {len(val)} images"
        )
        lines += [f"note:     {w.message}" for w in caught]
    return "\n".join(lines)
