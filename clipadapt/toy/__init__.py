"""The toy world (procedural images and captions, shifted domains) and the pretraining of the toy CLIP."""

from clipadapt.toy.world import CLASSES, DOMAINS, HELD_OUT, classnames, write_toy

__all__ = ["CLASSES", "DOMAINS", "HELD_OUT", "classnames", "write_toy"]
