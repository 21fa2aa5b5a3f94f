"""Test doubles shared by the base and DDP tests."""

from collections.abc import Iterable

from torch import nn

from clipadapt.methods import LinearProbe, Stage


class TwoStage(LinearProbe):
    """Test double: stage `probe` trains the head, stage `all` also the image tower at another lr."""

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage("probe", 1), Stage("all", -1, lr=1e-4))

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.head
        if stage == "all":
            yield from (p for _, p in self.clip.image_parameters())
