"""Run reports of a secure inference: bytes sent by each party, rounds, wall time and DReLUs,
per layer and in total, plus the time and bytes per image; JSON and a PNG of bytes per layer.

Bytes are payload bytes (8 per ring element; frame headers are listed separately as
``overhead_bytes``). The *set-up* (opening the server's masked weights once per session), the
*preprocessing* (the input-independent half of the conv/linear layers, per batch, before its
images enter, with the session's ``preprocess="ahead"``; with the default ``"interleaved"`` it
runs inside the layers and its bytes are theirs) and the *online* phase (from the images to the
output) are reported apart;
``total`` is their sum, and ``per_image`` gives each per image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..widths import width_range
from .netem import NETWORKS, network_estimates
from .ops import DROP_ATTR, WIDTH_ATTR, layer_drelus
from .program import Program
from .session import (PARTY_KEYS, SCOPE_HEADER, SCOPE_KEYS, SCOPE_OUTPUT, SCOPE_PREPROCESS,
                      SCOPE_SETUP)
from .stats import CommStats

__all__ = ["build_report", "save_report", "plot_report", "PARTY_KEYS"]



def _sent(stats: CommStats, scope: str) -> int:
    return stats.total(scope).sent if _has(stats, scope) else 0


def _has(stats: CommStats, scope: str) -> bool:
    return any(p == scope or p.startswith(scope + "/") for p in stats.scopes)


def _rounds(stats: Sequence[CommStats], scope: str) -> int:
    return max((st.scopes[scope].rounds if scope in st.scopes else 0) for st in stats)


def _exact_range(program: Program, layer) -> float | None:
    """The largest |comparison input| (real units) a layer's calibrated width decides exactly
    (:func:`secure_inference.widths.width_range`); None for the session's DReLU."""
    bits = layer.attrs.get(WIDTH_ATTR)
    if bits is None or program.frac_bits is None:
        return None
    return width_range(int(bits), program.frac_bits)


def build_report(program: Program, results: Sequence[dict[str, Any]], *,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of one session from the three parties' :func:`~.party.run_party` results."""
    stats: list[CommStats] = [r["stats"] for r in results]
    sizes = list(results[0]["batch_sizes"])
    images = int(sum(sizes))
    layers = []
    tot_online = [0, 0, 0]
    tot_setup = [0, 0, 0]
    drelus_total = 0
    for layer in program.layers:
        setup_scope = f"{layer.name}/{SCOPE_SETUP}"
        setup = [_sent(st, setup_scope) for st in stats]
        online = [_sent(st, layer.name) - s for st, s in zip(stats, setup)]
        drelus = sum(layer_drelus(layer, b) for b in sizes)
        drelus_total += drelus
        rounds = _rounds(stats, layer.name) - _rounds(stats, setup_scope)
        wall = max(r["layer_seconds"].get(layer.name, 0.0) for r in results)
        for i in range(3):
            tot_online[i] += online[i]
            tot_setup[i] += setup[i]
        layers.append({
            "name": layer.name, "op": layer.op, "where": layer.where,
            "output_shape": list(layer.shape[1:]),
            "bytes_sent": dict(zip(PARTY_KEYS, online)), "bytes": sum(online),
            "setup_bytes": sum(setup), "rounds": rounds, "wall_s": wall, "drelus": drelus,
            "drelu_width": (layer.attrs.get(WIDTH_ATTR, "session") if drelus else None),
            "drelu_range": _exact_range(program, layer) if drelus else None,
            "drelu_dropped_bits": int(layer.attrs.get(DROP_ATTR, 0)) if drelus else None})
    out_bytes = [_sent(st, SCOPE_OUTPUT) for st in stats]
    hdr_bytes = [_sent(st, SCOPE_HEADER) for st in stats]
    pre_bytes = [_sent(st, SCOPE_PREPROCESS) for st in stats]
    pre_s = max(float(r.get("preprocess_seconds", 0.0)) for r in results)
    key_bytes = [_sent(st, SCOPE_KEYS) for st in stats]
    online_total = [a + b for a, b in zip(tot_online, out_bytes)]
    online_s = max(r["online_seconds"] for r in results)
    setup_s = max(r["setup_seconds"] for r in results)
    online_rounds = sum(l["rounds"] for l in layers) + _rounds(stats, SCOPE_OUTPUT)
    setup_rounds = max(max((st.scopes[p].rounds for p in st.scopes if p.endswith(SCOPE_SETUP)),
                           default=0) for st in stats)
    total_bytes = (sum(online_total) + sum(tot_setup) + sum(hdr_bytes) + sum(key_bytes)
                   + sum(pre_bytes))
    widths = program.widths()
    report = {
        "meta": dict(meta or {}),
        "drelu_widths": {"calibrated": program.frac_bits is not None,
                         "min": min(widths.values(), default=None),
                         "max": max(widths.values(), default=None),
                         "what": "bits each DReLU layer compares (layers[].drelu_width; "
                                 "'session': the session's DReLU, 64 bits unless --drelu-bits) "
                                 "and the largest |input| in real units it decides exactly "
                                 "(layers[].drelu_range: 2^(width-1-frac_bits), public like "
                                 "the width; beyond it a decision may be wrong, never a "
                                 "leak); layers[].drelu_dropped_bits: low bits a ReLU layer "
                                 "drops (opt-in calibration --drop-budget; then a small "
                                 "positive input below 2^(dropped-frac_bits) may read as "
                                 "negative)"},
        "cpu_seconds": dict(zip(PARTY_KEYS, (float(r.get("cpu_seconds", 0.0)) for r in results))),
        "images": images, "batch_sizes": sizes,
        "layers": layers,
        "output": {"bytes_sent": dict(zip(PARTY_KEYS, out_bytes)), "bytes": sum(out_bytes),
                   "rounds": _rounds(stats, SCOPE_OUTPUT)},
        "setup": {"bytes_sent": dict(zip(PARTY_KEYS, tot_setup)), "bytes": sum(tot_setup),
                  "wall_s": setup_s, "rounds_max_per_layer": setup_rounds,
                  "what": "server weights masked and opened once per session"},
        "session": {"bytes_sent": {k: hdr_bytes[i] + key_bytes[i] for i, k in enumerate(PARTY_KEYS)},
                    "bytes": sum(hdr_bytes) + sum(key_bytes),
                    "what": "key agreement and the client's batch-size header"},
        "preprocess": {"bytes_sent": dict(zip(PARTY_KEYS, pre_bytes)), "bytes": sum(pre_bytes),
                       "rounds": _rounds(stats, SCOPE_PREPROCESS), "wall_s": pre_s,
                       "what": "input-independent half of the conv/linear layers, per batch"},
        "online": {"bytes_sent": dict(zip(PARTY_KEYS, online_total)),
                   "bytes": sum(online_total), "rounds": online_rounds, "wall_s": online_s,
                   "drelus": drelus_total},
        "total": {"bytes_sent": {k: online_total[i] + tot_setup[i] + hdr_bytes[i] + key_bytes[i]
                                 + pre_bytes[i] for i, k in enumerate(PARTY_KEYS)},
                  "bytes": total_bytes,
                  "rounds": max(st.total("").rounds for st in stats),
                  "wall_s": online_s + setup_s + pre_s, "drelus": drelus_total,
                  "overhead_bytes": sum(st.total("").overhead_sent for st in stats)},
        "per_image": {"online_seconds": online_s / images, "online_bytes": sum(online_total) / images,
                      "drelus": drelus_total / images,
                      "preprocess_seconds": pre_s / images,
                      "preprocess_bytes": sum(pre_bytes) / images,
                      "seconds_preprocess_and_online": (pre_s + online_s) / images,
                      "bytes_preprocess_and_online": (sum(pre_bytes) + sum(online_total)) / images,
                      "seconds_with_setup": (online_s + setup_s + pre_s) / images,
                      "bytes_with_setup": total_bytes / images},
    }
    per = report["per_image"]
    rounds_per_image = (report["online"]["rounds"] + report["preprocess"]["rounds"]) / images
    report["networks"] = {
        "what": "estimated seconds per image = compute (this run's preprocessing + online on "
                "loopback) + bytes per image (all parties, preprocessing + online) / bandwidth "
                "+ rounds per image (online + preprocessing, amortised over the batch) x RTT; "
                "bytes as if on one shared link (an upper bound: the three links run in "
                "parallel). Set-up (once per session) not included",
        "rounds_per_image": rounds_per_image,
        **network_estimates(per["seconds_preprocess_and_online"],
                            per["bytes_preprocess_and_online"], rounds_per_image, NETWORKS)}
    report["what"] = {
        "layers": "per layer: bytes, bytes_sent, setup_bytes and rounds are totals over all "
                  "images and batches of the session (online phase); wall_s is the maximum "
                  "over the three parties of each one's time in the layer, summed over "
                  "batches; drelus is the total over all images",
        "per_image": "totals divided by the number of images",
        "bytes": "payload bytes (frame headers in total.overhead_bytes)"}
    return report


def save_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as indented JSON (creates the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def plot_report(report: dict[str, Any], path: str | os.PathLike, *, title: str | None = None
                ) -> Path:
    """A PNG bar chart of the online bytes per layer, stacked by sending party."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [l for l in report["layers"] if l["bytes"] > 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(layers) + 2), 4.5))
    bottom = [0.0] * len(layers)
    xs = range(len(layers))
    for key in PARTY_KEYS:
        vals = [l["bytes_sent"][key] / 1e6 for l in layers]
        ax.bar(xs, vals, bottom=bottom, label=f"sent by {key}")
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_xticks(list(xs))
    ax.set_xticklabels([l["name"] for l in layers], rotation=90, fontsize=5)
    ax.set_ylabel("MB (online, all images)")
    ax.set_title(title or f"bytes per layer: {report['online']['bytes'] / 1e6:.1f} MB online, "
                 f"{report['images']} image(s)")
    ax.legend()
    nets = {k: v for k, v in report.get("networks", {}).items() if isinstance(v, dict)}
    if nets:
        text = "estimated s/image: " + "; ".join(
            f"{name} {v['seconds_per_image']:.2f}" for name, v in nets.items())
        ax.text(0.99, 0.80, text, transform=ax.transAxes, ha="right", va="top", fontsize=7,
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
