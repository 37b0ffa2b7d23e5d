"""Loading the simulator's data files (``vrex/hw/configs``): hardware, methods, systems, constants.

A value written ``fitted:<name>`` is looked up in ``configs/fitted.yaml``, the only file the fitting
script (:mod:`vrex.hw.fit`) writes; everything else is a datasheet/paper value or a documented
assumption (see the comments in each file and ``docs/hw.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
FITTED_PATH = CONFIG_DIR / "fitted.yaml"


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_fitted(path: Path | None = None) -> dict[str, float]:
    """The fitted constants (``{name: value}``); empty when the fit has not been run."""
    p = path or FITTED_PATH
    if not p.exists():
        return {}
    data = read_yaml(p) or {}
    return {k: float(v["value"]) for k, v in data.get("constants", {}).items()}


def resolve(value: Any, fitted: dict[str, float]) -> Any:
    """Replace ``fitted:<name>`` by its value."""
    if isinstance(value, str) and value.startswith("fitted:"):
        key = value.split(":", 1)[1]
        if key not in fitted:
            raise KeyError(f"fitted constant {key!r} missing: run `python -m vrex.hw.fit` to create {FITTED_PATH.name}")
        return fitted[key]
    return value


@dataclass(frozen=True)
class Hardware:
    """One platform of Table I plus its efficiency constants."""

    name: str
    label: str
    kind: Literal["gpu", "vrex"]
    peak_flops: float  # FLOP/s
    dram_kind: str
    dram_bw: float  # B/s
    dram_bytes: float
    link_kind: str
    link_bw: float  # B/s
    lanes: int
    offload: Literal["ssd", "host"]
    power_w: float
    mem_eff: float
    gemm_eff: float  # achievable fraction of peak on large GEMMs (GPUs); 1.0 on V-Rex (tiling model)
    op_overhead_s: float
    link_eff: float
    sync_s: float = 0.0  # host->device->host round trip a synchronising op adds on top of its host cost
    cores: int = 0
    freq_hz: float = 0.0
    sms: int = 0  # GPU streaming multiprocessors (wave quantisation)
    idle_w: float = 0.0  # GPU board power while waiting
    reserve_bytes: float = 0.0  # device memory the runtime/OS keeps
    dre: bool = True  # V-Rex cores carry the DRE (HCU, WTU, KVMU); False: plain LPU cores
    vision_eff: float = 1.0  # achieved fraction of the compute bound on the frame encoder
    host_cpu_flops: float = 0.0  # achieved FP32 FLOP/s of the host CPU on attention (FlexGen's CPU delegation)
    host_cpu_bw: float = 0.0  # achieved bytes/s the host CPU reads from its DRAM
    host_cpu_eff: float = 0.0  # host_cpu_flops / the CPU's FP32 peak


@dataclass(frozen=True)
class Method:
    """A KV retrieval method (see ``configs/methods.yaml``)."""

    name: str
    label: str
    predictor: Literal["none", "resv", "infinigen", "rekv"]
    frame_ratio: float
    text_ratio: float
    granule: Literal["all", "token", "frame", "cluster"]
    on_dre: bool = False
    kvmu: bool = False
    adaptive: bool = False
    predict_frames: bool = True
    ops_per_layer: int = 0
    clustering_ops_per_layer: int = 0  # of ops_per_layer: hashing + clustering (ReSV), the rest scores/selects
    syncs_per_layer: int = 0  # of ops_per_layer: ops whose output size depends on data (the host waits)
    clustering_syncs_per_layer: int = 0  # of syncs_per_layer: in hashing + clustering
    partial_dim_frac: float = 1.0
    kv_bits: float = 16.0  # bits per stored KV value (Oaken-like quantisation: ~4)
    device_first: bool = False  # keep the KV on the device until it no longer fits (no retrieval budget)
    sched_tasks_per_layer: int = 0  # host-side scheduling tasks per layer, synchronised (FlexGen)
    cpu_attention: bool = False  # attention over an offloaded KV on the host CPU (FlexGen's CPU delegation)


@dataclass(frozen=True)
class System:
    name: str
    hw: Hardware
    method: Method

    @property
    def label(self) -> str:
        return f"{self.hw.label} + {self.method.label}" if self.hw.kind == "gpu" else f"{self.hw.label} ({self.method.label})"


@dataclass(frozen=True)
class Constants:
    """Global constants (``configs/constants.yaml``), storage tiers and Table III."""

    values: dict[str, float]
    storage: dict[str, dict[str, float]] = field(default_factory=dict)
    area_power: dict[str, Any] = field(default_factory=dict)
    energy: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, k: str) -> float:
        return self.values[k]

    def get(self, k: str, default: float) -> float:
        return self.values.get(k, default)


def load_hardware(name: str, fitted: dict[str, float] | None = None) -> Hardware:
    fitted = load_fitted() if fitted is None else fitted
    path = CONFIG_DIR / "hardware" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "hardware").glob("*.yaml"))
        raise KeyError(f"unknown hardware {name!r}; known: {known}")
    d = read_yaml(path)
    return Hardware(
        name=d["name"], label=d["label"], kind=d["kind"],
        peak_flops=float(d["peak_tflops"]) * 1e12,
        dram_kind=d["dram"]["kind"], dram_bw=float(d["dram"]["gbps"]) * 1e9, dram_bytes=float(d["dram"]["gb"]) * 1e9,
        link_kind=d["link"]["kind"], link_bw=float(d["link"]["gbps"]) * 1e9, lanes=int(d["link"]["lanes"]),
        offload=d["offload"], power_w=float(d["power_w"]),
        mem_eff=float(resolve(d["mem_eff"], fitted)), gemm_eff=float(resolve(d["gemm_eff"], fitted)),
        op_overhead_s=float(d.get("op_overhead_us", 0.0)) * 1e-6, sync_s=float(d.get("sync_us", 0.0)) * 1e-6,
        link_eff=float(resolve(d["link_eff"], fitted)),
        cores=int(d.get("cores", 0)), freq_hz=float(d.get("freq_mhz", 0.0)) * 1e6, sms=int(d.get("sms", 0)),
        idle_w=float(d.get("idle_w", 0.0)), reserve_bytes=float(d.get("reserve_gb", 0.0)) * 1e9,
        dre=bool(d.get("dre", d["kind"] == "vrex")), vision_eff=float(resolve(d.get("vision_eff", 1.0), fitted)),
        host_cpu_flops=_cpu(d, "peak_gflops", fitted) * _cpu(d, "eff", fitted) * 1e9,
        host_cpu_bw=_cpu(d, "gbps", fitted) * 1e9, host_cpu_eff=_cpu(d, "eff", fitted),
    )


def _cpu(d: dict, key: str, fitted: dict[str, float]) -> float:
    return float(resolve((d.get("host_cpu") or {}).get(key, 0.0), fitted))


@lru_cache(maxsize=None)
def _methods() -> dict[str, dict]:
    return read_yaml(CONFIG_DIR / "methods.yaml")


def load_method(name: str) -> Method:
    m = _methods()
    if name not in m:
        raise KeyError(f"unknown method {name!r}; known: {sorted(m)}")
    return Method(name=name, **m[name])


def system_names() -> list[str]:
    return list(read_yaml(CONFIG_DIR / "systems.yaml"))


def load_system(name: str, fitted: dict[str, float] | None = None) -> System:
    systems = read_yaml(CONFIG_DIR / "systems.yaml")
    if name not in systems:
        raise KeyError(f"unknown system {name!r}; known: {sorted(systems)}")
    s = systems[name]
    return System(name, load_hardware(s["hardware"], fitted), load_method(s["method"]))


def load_constants(fitted: dict[str, float] | None = None, overrides: dict[str, float] | None = None) -> Constants:
    fitted = load_fitted() if fitted is None else fitted
    raw = read_yaml(CONFIG_DIR / "constants.yaml")
    vals = {k: float(resolve(v, fitted)) for k, v in raw.items()}
    vals.update(overrides or {})
    return Constants(vals, read_yaml(CONFIG_DIR / "storage.yaml"), read_yaml(CONFIG_DIR / "area_power.yaml"),
                     read_yaml(CONFIG_DIR / "energy.yaml"))


__all__ = [
    "CONFIG_DIR", "FITTED_PATH", "Hardware", "Method", "System", "Constants",
    "load_fitted", "load_hardware", "load_method", "load_system", "load_constants", "system_names", "resolve",
]
