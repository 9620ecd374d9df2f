"""``cdg speed``: images/s of the dense, the masked-dense gated and the sparse inference forms of a
run's backbone, side by side (docs/design.md §7: ratios measured in one process, interleaved rounds,
medians, on a named host).

The three forms, all float32, eval mode, branch a1, channels-last:

* ``dense``:  the same architecture and width with every gated convolution replaced by its dense W,
  BatchNorm folded (oneDNN) — :func:`cdg.sparse.export_inference` with ``dense=True``;
* ``masked``: today's gated eval, ``backbone.eval()`` (base path, gate, the dense convolution and
  Eq. 3: nothing is saved);
* ``sparse``: :func:`cdg.sparse.export_inference` (the conditional path only at open entries).

Per round every form runs once (``reps`` forwards at batch 1), in turn; the median over rounds is
reported, as wall-clock images/s and as images per CPU-second of the process (less sensitive to
other jobs on a shared host). Per gated layer: the median time of the sparse form's base path, gate
and conditional path (+ epilogue), of the dense form's convolution, and the layer's eta on the
measured images. Next to each speedup: the exact whole-network FLOPs reduction for the eta measured
on these images (:func:`cdg.metrics.mac_report`), the run's own (test set, ``metrics.json``), and
speedup / reduction. Peak RSS at batch 64: one subprocess per form resets the kernel's high-water
mark (``/proc/self/clear_refs``) after building the form and reads ``VmHWM`` after three forwards.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

FORMS = ("dense", "masked", "sparse")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_TOP_PAD_": "1073741824"}


def host_name() -> str:
    """The CPU model (``/proc/cpuinfo``), the core count and PyTorch's vector capability."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def load_images(cfg: Any, n: int, random: bool = False) -> tuple[Tensor, str]:
    """The first ``n`` test images of the run's dataset, normalised, channels-last (random normal
    images where the dataset is not available or ``random``); and what they are."""
    if not random:
        try:
            from cdg.builders import build_eval_datasets
            from cdg.data import TensorImageDataset, dataset_info, normalize_batch

            _, test = build_eval_datasets(cfg)
            if isinstance(test, TensorImageDataset):
                info = dataset_info(cfg.data.dataset)
                x = normalize_batch(test.images[:n], info.mean, info.std)
                return x.contiguous(memory_format=torch.channels_last), f"the first {n} {cfg.data.dataset} test images"
        except Exception as e:  # no data here: say so and time on noise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"cdg speed: {cfg.data.dataset} test images not available ({reason}); timing random images")
    size = 32 if cfg.model.stem == "cifar" else 224
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last), f"{n} random N(0, 1) images"


def build_forms(backbone: nn.Module) -> dict[str, nn.Module]:
    from cdg.sparse import export_inference

    masked = backbone.eval().to(memory_format=torch.channels_last)
    return {"dense": export_inference(backbone, dense=True), "masked": masked, "sparse": export_inference(backbone)}


def _timer(model: nn.Module, x: Tensor, reps: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        with torch.no_grad():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                model(x)
            return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps
    return run


def throughput(forms: dict[str, nn.Module], x: Tensor, rounds: int, min_seconds: float = 0.05) -> dict[str, dict[str, float]]:
    """Median seconds per forward (wall and process CPU) of each form, interleaved rounds."""
    one = _timer(forms["dense"], x, 1)
    one()
    w, _ = one()
    reps = max(1, int(min_seconds / max(w, 1e-6)))
    timers = {k: _timer(m, x, reps) for k, m in forms.items()}
    for t in timers.values():  # warm-up (the C++ kernel is built here on first use)
        t()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t())
    return {k: {"wall_s": statistics.median(s[0] for s in v), "cpu_s": statistics.median(s[1] for s in v),
                "reps": reps} for k, v in samples.items()}


def per_layer(forms: dict[str, nn.Module], x: Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds per gated layer: the sparse form's base / gate / cond, the dense form's
    convolution at the same place, the masked-dense GatedConv2d (without its BatchNorm); and eta."""
    from cdg.nn import GatedConv2d

    sparse, dense, masked = forms["sparse"], forms["dense"], forms["masked"]
    names = [n for n, _ in sparse.gated()]
    clocks: dict[str, dict[str, float]] = {"dense": {}, "masked": {}}
    hooks = []
    for form, model, kind in (("dense", dense, nn.Module), ("masked", masked, GatedConv2d)):
        mods = dict(model.named_modules())
        for n in names:
            m = mods[n]
            hooks.append(m.register_forward_pre_hook(lambda *_, f=form, n=n: clocks[f].__setitem__(n, -time.perf_counter())))
            hooks.append(m.register_forward_hook(lambda *_, f=form, n=n: clocks[f].__setitem__(n, clocks[f][n] + time.perf_counter())))
    rows: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ("base", "gate", "cond", "dense", "masked")} for n in names}
    sparse.set_flags(profile=True, track=True)
    sparse.reset_stats()
    try:
        with torch.no_grad():
            for model in (dense, masked, sparse):
                model(x)
            sparse.reset_stats()
            for _ in range(rounds):
                dense(x)
                masked(x)
                for _, m in sparse.gated():
                    m.times = {"base": 0.0, "gate": 0.0, "cond": 0.0}
                sparse(x)
                for n, m in sparse.gated():
                    for k in ("base", "gate", "cond"):
                        rows[n][k].append(m.times[k])
                    rows[n]["dense"].append(clocks["dense"][n])
                    rows[n]["masked"].append(clocks["masked"][n])
    finally:
        for h in hooks:
            h.remove()
        sparse.set_flags(profile=False, track=False)
    eta = sparse.eta_per_layer()
    sparse.reset_stats()
    return {n: {**{k: statistics.median(v) for k, v in r.items()}, "eta": eta[n]} for n, r in rows.items()}


def measured_eta(sparse: nn.Module, x: Tensor) -> dict[str, float]:
    sparse.set_flags(track=True)
    sparse.reset_stats()
    with torch.no_grad():
        sparse(x)
    eta = sparse.eta_per_layer()
    sparse.set_flags(track=False)
    sparse.reset_stats()
    return eta


# ----------------------------------------------------------------------------- peak RSS


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_child(run: str, form: str, batch: int) -> None:
    """Entry point of the RSS subprocess: prints a JSON line with the form's peak RSS (KiB)."""
    from cdg.runs import load_run

    torch.set_num_threads(1)
    cfg, backbone = load_run(run)
    x, _ = load_images(cfg, batch, random=True)
    model = build_forms(backbone)[form]
    del backbone
    gc.collect()
    with torch.no_grad():  # build the C++ kernel and warm oneDNN outside the measured part
        model(x[:1])
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    before = _status_kib("VmRSS")
    with torch.no_grad():
        for _ in range(3):
            model(x)
    peak = _status_kib("VmHWM") if reset else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"form": form, "rss_before_kib": before, "peak_kib": peak, "hwm_reset": reset}))


def peak_rss(run: str, batch: int = 64) -> dict[str, dict[str, Any]]:
    out = {}
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    for form in FORMS:
        code = f"from cdg.sparse.speed import rss_child; rss_child({run!r}, {form!r}, {batch})"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        out[form] = json.loads(line[-1]) if p.returncode == 0 and line else {"error": p.stderr.strip()[-300:]}
    return out


# ----------------------------------------------------------------------------- the report


def speed_report(run: str, batches: tuple[int, ...] = (1, 64), threads: tuple[int, ...] = (1,), rounds: int = 7,
                 random_input: bool = False, rss: bool = True, layer_batch: int = 64) -> dict[str, Any]:
    """Everything ``cdg speed`` prints, as a dict (see the module docstring)."""
    from cdg.metrics import mac_report
    from cdg.runs import load_run, read_metrics
    from cdg.sparse.check import compare

    cfg, backbone = load_run(run)
    metrics = read_metrics(run)
    x_all, what = load_images(cfg, max(batches + (layer_batch,)), random_input)
    forms = build_forms(backbone)
    torch.set_num_threads(1)
    check = compare(backbone, forms["sparse"], x_all[:64])
    eta = measured_eta(forms["sparse"], x_all[:64])
    rep = mac_report(cfg)
    result: dict[str, Any] = {
        "run": str(run), "host": host_name(), "torch": torch.__version__, "images": what, "dtype": "float32",
        "layout": "channels_last", "model": cfg.model.name, "width": cfg.model.width,
        "gating": f"{cfg.gating.mode} G={cfg.gating.groups} C_g={cfg.gating.group_size}",
        "malloc_env": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
        "check": check.summary(), "eta_measured": sum(eta.values()) / max(1, len(eta)),
        "flops_reduction_measured_eta": rep.reduction_exact(eta) if eta else 1.0,
        "flops_reduction_run": metrics.get("flops_reduction_exact"), "eta_run": metrics.get("eta"),
        "rounds": rounds, "throughput": [], "layers": {},
    }
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            med = throughput(forms, x_all[:b], rounds)
            row = {"threads": t, "batch": b}
            for k, v in med.items():
                row[f"{k}_img_s"] = b / v["wall_s"]
                row[f"{k}_img_cpu_s"] = b / v["cpu_s"] if v["cpu_s"] > 0 else float("nan")
                row["reps"] = v["reps"]
            result["throughput"].append(row)
    torch.set_num_threads(1)
    for b in sorted({1, layer_batch}):
        result["layers"][str(b)] = per_layer(forms, x_all[:b], rounds)
    if rss:
        result["peak_rss_batch64"] = peak_rss(run, 64)
    return result


def format_report(r: dict[str, Any]) -> str:
    red, red_run = r["flops_reduction_measured_eta"], r["flops_reduction_run"]
    lines = [
        f"# cdg speed: {r['run']}",
        f"host: {r['host']}; torch {r['torch']}; {r['dtype']}, {r['layout']}, eval, branch a1",
        f"model: {r['model']} width {r['width']}, {r['gating']}; images: {r['images']}",
        f"protocol: {r['rounds']} interleaved rounds per setting, medians; several forwards per round at batch 1; "
        f"malloc env of docs/design.md §7 {'set' if r['malloc_env'] else 'NOT set (export MALLOC_MMAP_MAX_=0 ...)'}",
        f"sparse vs masked-dense reference (batch 64): {r['check']}",
        f"eta on these images {r['eta_measured']:.3f} -> exact FLOPs reduction {red:.2f}x"
        + (f"; the run's (test set): eta {r['eta_run']:.3f}, {red_run:.2f}x" if red_run else ""),
        "",
        "| threads | batch | dense img/s | masked img/s | sparse img/s | sparse/dense | sparse/masked | "
        "FLOPs red. | achieved | sparse/dense (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["throughput"]:
        sd = row["sparse_img_s"] / row["dense_img_s"]
        sm = row["sparse_img_s"] / row["masked_img_s"]
        sdc = row["sparse_img_cpu_s"] / row["dense_img_cpu_s"]
        lines.append(f"| {row['threads']} | {row['batch']} | {row['dense_img_s']:.1f} | {row['masked_img_s']:.1f} | "
                     f"{row['sparse_img_s']:.1f} | {sd:.2f}x | {sm:.2f}x | {red:.2f}x | {sd / red:.0%} | {sdc:.2f}x |")
    for b, layers in r["layers"].items():
        lines += ["", f"Per gated layer, 1 thread, batch {b} (ms, medians): sparse = base + gate + cond(+BN, shortcut, "
                  "ReLU); dense = the folded dense conv(+bias, shortcut, ReLU); masked = GatedConv2d alone", "",
                  "| layer | eta | base | gate | cond | sparse | dense | masked | sparse/dense |", "|---|---|---|---|---|---|---|---|---|"]
        tot = {k: 0.0 for k in ("base", "gate", "cond", "dense", "masked")}
        for n, v in layers.items():
            s = v["base"] + v["gate"] + v["cond"]
            for k in tot:
                tot[k] += v[k]
            lines.append(f"| {n} | {v['eta']:.3f} | {1e3 * v['base']:.3f} | {1e3 * v['gate']:.3f} | {1e3 * v['cond']:.3f} | "
                         f"{1e3 * s:.3f} | {1e3 * v['dense']:.3f} | {1e3 * v['masked']:.3f} | {v['dense'] / s:.2f}x |")
        s = tot["base"] + tot["gate"] + tot["cond"]
        lines.append(f"| all gated | | {1e3 * tot['base']:.2f} | {1e3 * tot['gate']:.2f} | {1e3 * tot['cond']:.2f} | "
                     f"{1e3 * s:.2f} | {1e3 * tot['dense']:.2f} | {1e3 * tot['masked']:.2f} | {tot['dense'] / s:.2f}x |")
    if "peak_rss_batch64" in r:
        lines += ["", "Peak RSS at batch 64 (MiB; one subprocess per form, VmHWM reset after building the form, "
                  "3 forwards; 'during forwards' = peak - RSS before):", ""]
        for form, v in r["peak_rss_batch64"].items():
            if "error" in v:
                lines.append(f"- {form}: error {v['error']}")
            else:
                lines.append(f"- {form}: peak {v['peak_kib'] / 1024:.1f}, during forwards "
                             f"+{(v['peak_kib'] - v['rss_before_kib']) / 1024:.1f}")
    return "\n".join(lines) + "\n"
