"""Every notebook runs top to bottom on toy-world runs of the methods it analyses, and ships without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from clipadapt import cli

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TOY = str(REPO / "configs" / "toy.yaml")
# The analysis each notebook needs: the method module it reads outputs of, and the file that proves a run is there.
NEEDS = {
    "02-ast-selection": ("clipadapt.methods.clip_ast", "selection.json"),
    "03-adapt-masks": ("clipadapt.methods.adapt", "masks.json"),
    "04-rada-mask": ("clipadapt.methods.rada", "config.yaml"),
}


def sweep(runs: Path, tmp: Path, config: str, *args: str) -> None:
    """`clipadapt sweep` of `config` on the pretrained toy CLIP (configs/toy.yaml: toy_dusk, base-to-novel + toy)."""
    common = ["--out", str(runs), "--data.root", str(tmp / "toy"), "--data.cache_dir", str(tmp / "cache")]
    cli.sweep_main(
        ["--config", str(REPO / "configs" / config), "--config", TOY, *common, "--trainer.max_epochs", "3", *args]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real toy-world runs (the pretrained toy CLIP adapting to toy_dusk), so the figures show learning:
    a linear-probe few-shot curve, and one run of each analysed method."""
    tmp = tmp_path_factory.mktemp("notebooks")
    runs = tmp / "runs"
    fewshot = ["--data.subsample", "all", "--data.eval_sets", "[all]"]
    sweep(runs, tmp, "linear_probe_fewshot.yaml", "--shots", "1", "4", "16", "--seeds", "1", *fewshot)
    sweep(runs, tmp, "ast_base2novel.yaml", "--shots", "16", "--seeds", "1")
    sweep(runs, tmp, "rada_base2novel.yaml", "--shots", "16", "--seeds", "1")
    pruning = ["--model.init_args.max_length", "4", "--model.init_args.target_length", "8"]
    pruning += ["--model.init_args.prune_per_step", "1", "--model.init_args.accumulate_steps", "1"]
    pruning += ["--model.init_args.prune_after_epochs", "1"]
    sweep(runs, tmp, "adapt_fewshot.yaml", "--shots", "16", "--seeds", "1", *pruning)
    return runs


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(notebook: Path):
    book = nbformat.read(notebook, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{notebook.name}: outputs not stripped"
            assert "tests" not in cell.source and "conftest" not in cell.source  # notebooks import clipadapt only


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.slow  # 15-30 s each, + 13 s for the runs fixture, on a loaded 2-core machine: make test-slow
def test_notebook_executes(notebook: Path, runs: Path, monkeypatch: pytest.MonkeyPatch):
    module, evidence = NEEDS.get(notebook.stem, (None, None))
    if module is not None:
        pytest.importorskip(module)
        assert list(runs.rglob(evidence)), f"the fixture made no run with {evidence}"
    monkeypatch.setenv("CLIPADAPT_RUNS", str(runs))
    book = nbformat.read(notebook, as_version=4)
    NotebookClient(book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    figures = [o for cell in book.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, f"{notebook.name} drew no figure from the runs"
    assert not any(o.get("output_type") == "error" for cell in book.cells for o in cell.get("outputs", []))
