"""Few-shot generative transfer: adapt a pretrained diffusion model to a new image domain.

The method's second half. A frozen base ``UNet2DModel`` (e.g. the shipped Fashion-MNIST DDPM)
gets ONE shared ANL adapter, tuned on a few images ("shots") of a target domain, each shot
conditioned on its own encoder tokens; masked sampling conditioned on the shots' tokens then
draws new images of the domain. Two references at equal steps: ``full`` fine-tunes the whole
U-Net with the same denoising loss (unconditional), ``scratch`` trains a U-Net of the same
config from fresh weights on the shots. The shots are a seeded draw from the target's images;
the rest are held out, and the samples are measured against them only.

A run lives in ``<runs_dir>/<mode>-<target>-<confighash>/``; its steps (declared in
``pipeline.transfer.steps``) run in order and each
writes its outputs atomically, then ``stages/<step>.json`` last, keyed by the config parts it
reads plus its upstream keys:

| step | writes |
| --- | --- |
| target | ``target/target.npz``: the shots and the held-out images (uint8 NHWC) |
| tune | ``model/``: the adapter (anl) or the whole U-Net (full, scratch), ``tune.json`` |
| sample | ``shards/``: the samples as Parquet shards (label 0, class name = target name) |
| evaluate | ``eval/metrics.json``: KID, diversity, near-copy share, cost |
| report | ``report.html`` (self-contained), ``report.md``, ``grid.png`` |

A rerun skips finished steps; a changed setting gives a new run directory, into which the
finished steps of a sibling run with the same keys are hard-linked instead of recomputed, so
a changed sampling setting reruns only sample, evaluate and report.
"""

from pipeline.transfer.config import TransferConfig, TransferError, transfer_config
from pipeline.transfer.run import check_transfer, run_transfer

__all__ = ["TransferConfig", "TransferError", "check_transfer", "run_transfer", "transfer_config"]
