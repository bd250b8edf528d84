"""Where the preprocessing time of a real three-process run goes.

Runs ResNet18-CIFAR-100 (all ReLUs) as ``run_local`` does (three party processes, loopback
TCP, TLS, AES-CTR, batch 1, default threads) and, inside each party process, profiles
``preprocess_batch`` with cProfile. Prints each party's preprocess/online seconds per image
and the top functions of the client's and helper's preprocessing.

    .venv/bin/python benchmark/secure_inference/profile_preprocess.py --images 3 [--profile]

With ``PYTHONPATH=<other checkout>`` it measures that checkout's library (the figures of
benchmark/mpc/README_linear.md compare the landed baseline this way, in the same session).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _profiled_party(party, private, *, program, threads, profile):
    """One party process: the library's own party body, with ``preprocess_batch`` wrapped in
    a cProfile (module attribute replaced in this process only)."""
    import secure_inference.mpc.party as P
    from secure_inference.mpc import local
    prof = cProfile.Profile() if profile else None
    inner = P.preprocess_batch

    def wrapped(*a, **k):
        if prof is None:
            return inner(*a, **k)
        prof.enable()
        try:
            return inner(*a, **k)
        finally:
            prof.disable()
    P.preprocess_batch = wrapped
    out = local._local_party(party, private, program, threads)
    text = ""
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        text = s.getvalue()
    out["profile_text"] = text
    out["library"] = str(Path(P.__file__).resolve().parents[2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import importlib.util

    import torch
    loader = importlib.util.spec_from_file_location("si_bench", HERE / "bench.py")
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)   # bench.py's model builder, without a sys.path edit
    build = bench.build
    from secure_inference.mpc.compile import compile_model
    from secure_inference.mpc.harness import run_local_processes
    from secure_inference.mpc.options import SessionLimits, SessionOptions
    from secure_inference.mpc.session import ROLE_CLIENT, ROLE_SERVER

    torch.manual_seed(0)   # the same (randomly initialised) model and images in every run
    model, chw = build("resnet18_cifar100")
    batches = [torch.randn((1,) + chw) for _ in range(args.images)]
    program, weights = compile_model(model, (1,) + chw)
    limits = SessionLimits.admitting([1] * args.images)
    fn = functools.partial(_profiled_party, program=program, threads=args.threads,
                           profile=args.profile)
    t0 = time.perf_counter()
    options = SessionOptions(frac_bits=16, timeout=3600, limits=limits, prg="aes")
    res = run_local_processes(fn, tls=True, private={ROLE_CLIENT: batches, ROLE_SERVER: weights},
                              options=options)
    wall = time.perf_counter() - t0
    n = args.images
    print(f"library: {res[0]['library']}  images: {n}  wall {wall:.2f} s")
    for r in res:
        print(f"party {r['role']}: preprocess {r['preprocess_seconds'] / n:.3f} s/image, "
              f"online {r['online_seconds'] / n:.3f} s/image, cpu {r['cpu_seconds']:.2f} s")
    print(f"preprocess_seconds per image (max over parties): "
          f"{max(r['preprocess_seconds'] for r in res) / n:.3f}")
    print(f"online_seconds per image (max over parties): "
          f"{max(r['online_seconds'] for r in res) / n:.3f}")
    out = res[0]["outputs"]
    print("client output checksum:", float(torch.cat(out).double().sum()))
    if args.profile:
        for r in res:
            if r["role"] != ROLE_SERVER:
                print(f"--- party {r['role']} preprocessing profile ---")
                print(r["profile_text"])


if __name__ == "__main__":
    main()
