"""Benchmark anl_core on whatever device is present; prints ratios measured in this one run.

1. Masked sampling images/s against the ceiling of a plain U-Net forward loop with the same
   batch and steps (guidance counted as two forwards, i.e. the loop runs at the doubled batch;
   compiled, with CUDA graphs on CUDA, when --compile), and against diffusers' DDIMPipeline on
   the bare U-Net (fp16 on CUDA) at the same batch and steps (aim: >= 2x at w=1).
2. Adapter-only tuning vs full fine-tuning: steps/s and peak memory (CUDA) for the same loop.

    python -m bench.anl                      # auto: DDPM-CIFAR10 U-Net on CUDA, small on CPU
    python -m bench.anl --size ddpm-cifar10 --batch 256 --steps 50 --compile

(Run benches as modules from the repository root: `python -m bench.anl`.)

Weights are random (no hub access here); only shapes matter for speed. Tokens have the shape
of CLIP ViT-B/32 tokens (50 x 512) for the CIFAR size and of EfficientNet-Lite0@128 (16 x 1280)
for the small CPU size.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from anl_core.inject import ANLConfig, attach_anl
from anl_core.sampling import masked_sample
from anl_core.tuning import TuneConfig, tune_adapter

# google/ddpm-cifar10-32's UNet2DModel config (35.7M parameters).
DDPM_CIFAR10 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256), "norm_num_groups": 32, "norm_eps": 1e-6,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
}
SMALL = {
    "sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": (32, 64, 64), "norm_num_groups": 16,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
SIZES = {"ddpm-cifar10": (DDPM_CIFAR10, 50, 512), "small": (SMALL, 16, 1280)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def timed(fn, device: torch.device, repeats: int = 2) -> float:
    """Seconds per call: the fastest of ``repeats`` calls after one warm-up call.

    The minimum, not the mean, because on a shared machine other work only ever adds time.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def forward_ceiling(unet: UNet2DModel, batch: int, steps: int, device: torch.device,
                    compile: bool) -> float:
    """Images/s of ``steps`` plain U-Net forwards at ``batch`` (no scheduler, no adapter)."""
    net = torch.compile(unet, dynamic=False, mode="reduce-overhead" if device.type == "cuda"
                        else None) if compile else unet
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor(500, device=device)

    @torch.no_grad()
    def loop():
        with autocast(device):
            for _ in range(steps):
                net(x, t, return_dict=False)

    return timed(loop, device)


def ddim_pipeline_rate(unet: UNet2DModel, scheduler, batch: int, steps: int,
                       device: torch.device) -> float:
    """Images/s of diffusers' DDIMPipeline on the bare U-Net (a copy in fp16 on CUDA)."""
    import copy

    from diffusers import DDIMPipeline, DDIMScheduler

    bare = copy.deepcopy(unet)
    for m in bare.modules():  # the copy drops the adapter's hooks: the bare base model
        m._forward_hooks.clear()
    if device.type == "cuda":
        bare = bare.half()
    pipe = DDIMPipeline(unet=bare, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def run():
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np")

    return batch / timed(run, device)


def bench_sampling(model, scheduler, tokens, args, device) -> list[tuple[str, float, float]]:
    rows = []
    b, steps = args.batch, args.steps
    for guidance, label in ((1.0, "w=1 (one pass)"), (args.guidance, f"w={args.guidance} (two)")):
        doubled = guidance != 1.0
        conds = tokens[: max(1, b // 4)]
        per = b // conds.shape[0]

        def run(conds=conds, per=per, guidance=guidance):
            masked_sample(model, scheduler, conds, per, mask_ratio=0.3, guidance=guidance,
                          num_inference_steps=steps, seed=0, batch_size=b, progress=False,
                          compile=args.compile)

        run()  # compiles (when --compile) outside the timing
        sample_s = timed(run, device)
        ceiling_s = forward_ceiling(model.unet, 2 * b if doubled else b, steps, device,
                                    args.compile)
        rows.append((label, conds.shape[0] * per / sample_s, b / ceiling_s))
    return rows


def train_loop(model, scheduler, images, tokens, params, steps, device) -> tuple[float, int | None]:
    """Steps/s and CUDA peak bytes of an AdamW noise-prediction loop over ``params``."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        noise = torch.randn(images.shape, generator=gen).to(device)
        t = torch.randint(1000, (images.shape[0],), generator=gen).to(device)
        with autocast(device):
            pred = model(scheduler.add_noise(images, noise, t), t, tokens=tokens)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, repeats=steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return 1.0 / seconds, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--batch", type=int, default=None, help="sampling batch (images)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the sampling step and the ceiling loop (CUDA "
                             "graphs on CUDA); compile time is not timed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or ("ddpm-cifar10" if cuda else "small")
    args.batch = args.batch or (512 if cuda else 8)
    args.steps = args.steps or (50 if cuda else 5)
    train_steps = args.train_steps or (20 if cuda else 3)
    unet_cfg, num_tokens, token_dim = SIZES[args.size]

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_cfg).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = attach_anl(unet, ANLConfig(token_dim=token_dim, num_tokens=num_tokens,
                                       encoder_id="bench"))
    for p in model.adapter_parameters():  # non-zero adapter: the real compute path
        torch.nn.init.normal_(p, std=0.02)
    counts = model.param_counts()
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
          f"size {args.size}, torch {torch.__version__}, compile {args.compile}")
    print(f"params: base {counts['base'] / 1e6:.2f}M, adapter (trainable) "
          f"{counts['trainable'] / 1e6:.2f}M = {counts['trainable'] / counts['total']:.1%} "
          "of all parameters")

    tokens = torch.randn(max(1, args.batch // 4), num_tokens, token_dim, device=device)
    print(f"\nmasked sampling, batch {args.batch}, {args.steps} DDIM steps, compile "
          f"{args.compile}")
    pipe_rate = ddim_pipeline_rate(model.unet, scheduler,
                                   args.batch, args.steps, device)
    print(f"{'guidance':<22}{'img/s':>10}{'ceiling img/s':>16}{'vs ceiling':>12}"
          f"{'DDIMPipeline img/s':>20}{'vs pipeline':>13}")
    for label, got, ceiling in bench_sampling(model, scheduler, tokens, args, device):
        print(f"{label:<22}{got:>10.1f}{ceiling:>16.1f}{got / ceiling:>12.2f}"
              f"{pipe_rate:>20.1f}{got / pipe_rate:>13.2f}")

    size = unet_cfg["sample_size"]
    images = torch.randn(args.train_batch, unet_cfg["in_channels"], size, size, device=device)
    train_tokens = torch.randn(args.train_batch, num_tokens, token_dim, device=device)
    model.train()
    adapter_sps, adapter_peak = train_loop(model, scheduler, images, train_tokens,
                                           model.adapter_parameters(), train_steps, device)
    result = tune_adapter(model, scheduler, images, train_tokens,
                          TuneConfig(steps=train_steps, batch_size=args.train_batch),
                          progress=False)
    unet.requires_grad_(True)  # full fine-tuning: every weight trains
    if cuda:
        torch.cuda.empty_cache()
    model.train()
    full_sps, full_peak = train_loop(model, scheduler, images, train_tokens,
                                     list(model.parameters()), train_steps, device)
    unet.requires_grad_(False)

    def mem(peak):
        return f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"

    print(f"\ntuning, batch {args.train_batch}, {train_steps} timed steps")
    print(f"{'what':<34}{'steps/s':>9}{'peak memory':>14}")
    print(f"{'adapter only (bare loop)':<34}{adapter_sps:>9.2f}{mem(adapter_peak):>14}")
    print(f"{'adapter only (tune_adapter, EMA)':<34}{result.steps_per_second:>9.2f}"
          f"{mem(result.peak_memory_bytes):>14}")
    print(f"{'full fine-tuning (bare loop)':<34}{full_sps:>9.2f}{mem(full_peak):>14}")
    print(f"adapter-only / full speed: {adapter_sps / full_sps:.2f}x")


if __name__ == "__main__":
    main()
