"""Measure the distortion of every (ReLU site, channel, candidate block size) of a model.

For each site s, channel c and candidate block size b this writes
D[s][c, b] = mean over N samples of the MSE between the model output with only (s, c)
replaced by Block-ReLU(b) and the clean output. The knapsack step
(research/knapsack_patch_size_extractor.py) reads the folder this writes.

Examples:
  # MMLab config (its secure_inference.distortion_data gives the images)
  python research/extract_block_sizes.py --config configs/classification/resnet18_cifar100.py \\
      --checkpoint work_dirs/r18/epoch_200.pth --output_path out/r18_dist --num_samples 2048
  # two CPU workers (torchrun + gloo), first-order estimate
  python research/extract_block_sizes.py ... --num_gpus 2 --device cpu --method linear
  # a torchvision model (or package.module:factory) and a folder of images
  python research/extract_block_sizes.py --model resnet18 --checkpoint r18.pth \\
      --image-folder imgs/ --input-shape 3 224 224 --output_path out/r18 --num_samples 256

The run is resumable: finished chunks live in OUTPUT/chunks and are skipped when the same
command is run again; the final collect step writes one .npz per site and meta.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

# torch, MMLab and the package (which applies its compatibility fixes on import) load after
# the arguments are parsed, so --help and argument errors answer at once.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags (argument errors exit with status 2 and a usage line)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model and data")
    src.add_argument("--config", help="MMLab config (.py) with a secure_inference entry")
    src.add_argument("--model", help="torchvision model name (arguments after commas: "
                     "resnet18,num_classes=10) or package.module:factory "
                     "(instead of --config; needs --image-folder and --input-shape)")
    src.add_argument("--checkpoint", help="weights file (mmengine or plain state dict)")
    src.add_argument("--image-folder", help="images for --model (resized, centre-cropped)")
    src.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                     help="input size; default: the config's secure_inference.input_shape")
    src.add_argument("--mean", type=float, nargs="+", default=None,
                     help="per-channel mean for --image-folder (default: ImageNet)")
    src.add_argument("--std", type=float, nargs="+", default=None,
                     help="per-channel std for --image-folder (default: ImageNet)")
    run = p.add_argument_group("what to compute")
    run.add_argument("--output_path", "--output-path", required=True,
                     help="results folder (new, empty, or a previous run of the same job)")
    run.add_argument("--num_samples", "--num-samples", type=int, required=True,
                     help="number of images averaged over")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the sample choice (and linear projections); recorded")
    run.add_argument("--method", choices=("exact", "linear", "naive"), default="exact",
                     help="exact (default), linear (first-order estimate, much faster) or "
                     "naive (one forward per candidate; reference)")
    run.add_argument("--sites", nargs="+", default=None,
                     help="only these site names (default: every replaceable ReLU site)")
    run.add_argument("--max-block-size", "--max_block_size", type=int, default=None,
                     help="largest square block side among the candidates (default: map size)")
    run.add_argument("--max-rect", type=int, default=4,
                     help="all h x w rectangles up to this side are candidates (default 4)")
    run.add_argument("--num-projections", type=int, default=8,
                     help="random output projections per sample for --method linear")
    perf = p.add_argument_group("execution")
    perf.add_argument("--num_gpus", "--num-gpus", type=int, default=1,
                      help="worker processes (torchrun; gloo on CPU, nccl on CUDA); work is "
                      "split by (site, channel chunk) (linear: by sample chunk, as its cost "
                      "does not depend on the channels)")
    perf.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda when available")
    perf.add_argument("--batch_size", "--batch-size", type=int, default=16,
                      help="samples per clean forward")
    perf.add_argument("--forward-batch", type=int, default=64,
                      help="perturbed rows per batched forward (exact)")
    perf.add_argument("--chunk-channels", type=int, default=16,
                      help="channels per saved chunk (exact/naive)")
    perf.add_argument("--max-chunks", type=int, default=None,
                      help="stop after this many chunks per worker (resume later)")
    perf.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.model):
        p.error("give exactly one of --config or --model")
    if args.model and (not args.image_folder or not args.input_shape):
        p.error("--model needs --image-folder and --input-shape")
    if args.num_gpus < 1:
        p.error("--num_gpus must be >= 1")
    return args


def _launch_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with --num_gpus workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.num_gpus}", "-m", "secure_inference.cli.extract_block_sizes",
           *argv]
    return subprocess.call(cmd)


def _build(args: argparse.Namespace, device: str):
    import torch
    from secure_inference.distortion.data import (IMAGENET_MEAN, IMAGENET_STD, config_samples,
                                                  folder_samples)
    from secure_inference.models import (ModelLoadError, load_config, load_config_model,
                                         load_model)
    if args.config:
        cfg_path = str(Path(args.config).resolve())
        cfg = load_config(cfg_path)
        # the one model-loading path (as the finetuning tools build it: data_preprocessor
        # merged in, secure_inference.convert applied, a spec recorded in the checkpoint applied)
        model = load_config_model(cfg, args.checkpoint)
        shape = args.input_shape or (cfg.get("secure_inference") or {}).get("input_shape")
        if shape is None:
            raise ModelLoadError("the config has no secure_inference.input_shape; pass "
                                 "--input-shape C H W")
        shape = tuple(int(v) for v in shape)
        samples = config_samples(cfg, model, args.num_samples, args.seed, shape,
                                 batch_size=args.batch_size)
        model_id = f"config:{cfg_path}"
    else:
        name = args.model
        model = load_model(name, args.checkpoint)
        shape = tuple(args.input_shape)
        mean = args.mean or (IMAGENET_MEAN if shape[0] == 3 else (0.5,))
        std = args.std or (IMAGENET_STD if shape[0] == 3 else (0.5,))
        samples = folder_samples(args.image_folder, shape, args.num_samples, args.seed,
                                 mean, std)
        model_id = f"model:{name}"
    if args.checkpoint:
        model_id += f" checkpoint:{Path(args.checkpoint).resolve()}"
    return model.to(torch.device(device)), model_id, samples


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and measure (or, with --num_gpus > 1, launch the workers); 0 on success,
    2 on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_gpus > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_workers(args, argv)

    import secure_inference  # noqa: F401  (compat fixes before torchvision / MMLab)
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from secure_inference.distortion import jobs
    from secure_inference.distortion.base import DistortionError
    from secure_inference.models import ModelLoadError
    from secure_inference.spec import SpecError  # SpecMismatchError (finetune) included

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(days=7))
    out = Path(args.output_path)
    say = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    try:
        if not args.checkpoint:
            say("warning: no --checkpoint given: measuring a randomly initialised model")
        model, model_id, samples = _build(args, device)
        job = jobs.Job(model=model, model_id=model_id, samples=samples, seed=args.seed,
                       method=args.method, sites=args.sites, batch_size=args.batch_size,
                       forward_batch=args.forward_batch, chunk_channels=args.chunk_channels,
                       num_projections=args.num_projections, max_rect=args.max_rect,
                       max_block_size=args.max_block_size, device=torch.device(device))
        bars = []

        def progress_bar(total: int):
            bars.append(tqdm(total=total, unit="eval", unit_scale=True, dynamic_ncols=True,
                             disable=args.no_progress or rank != 0, desc="distortion"))
            return bars[-1].update

        try:
            jobs.run_worker(job, out, rank=rank, world_size=world,
                            barrier=dist.barrier if world > 1 else None,
                            max_chunks=args.max_chunks, make_progress=progress_bar, log=say)
        finally:
            for bar in bars:
                bar.close()
        return 0
    except (DistortionError, ModelLoadError, SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
