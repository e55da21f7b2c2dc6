"""Settle third-party notices that no user of this project can act on, once, at an entry point.

transformers 5 warns, on the first look-up of ``CLIPImageProcessor`` and
``SiglipImageProcessor`` (which diffusers does when its pipelines are imported), that
torchvision is missing and that it falls back to the PIL processors. Our pipelines load
no image processor (no safety checker, no feature extractor), so the fallback changes
nothing here. Doing the look-up once, with transformers' logger at ERROR for the duration,
caches the fallback and consumes the one-time notice; every other transformers warning
still reaches the user.
"""

from __future__ import annotations

#: transformers' processors whose torchvision fallback diffusers' import triggers.
FALLBACK_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


def settle_image_processor_fallbacks() -> None:
    """Resolve transformers' PIL fallbacks for :data:`FALLBACK_PROCESSORS` without the notice."""
    import transformers
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        for name in FALLBACK_PROCESSORS:
            getattr(transformers, name, None)
    finally:
        transformers_logging.set_verbosity(level)
