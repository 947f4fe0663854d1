"""MoP, Mixture of Pruners: an iterative search that removes a block or heads+neurons at each step.

* :mod:`lit_prune.mop.search`: :class:`MoPSearch`, the loop, and :class:`MoPStep`, one recorded step.
* :mod:`lit_prune.mop.config`: :class:`MoPConfig`, the search's options (shared with the callback).
* :mod:`lit_prune.mop.proxy`: the proxies (``ppl``, ``kl``, ``cosine``, ``random``).
"""

from lit_prune.mop.config import DEPTH, MOP_DEPTH_CRITERIA, WIDTH, MoPConfig
from lit_prune.mop.proxy import PROXIES
from lit_prune.mop.search import MoPSearch, MoPStep
from lit_prune.surgery.masks import register_width_masks, skipping_block

__all__ = [
    "DEPTH",
    "MOP_DEPTH_CRITERIA",
    "PROXIES",
    "WIDTH",
    "MoPConfig",
    "MoPSearch",
    "MoPStep",
    "register_width_masks",
    "skipping_block",
]
