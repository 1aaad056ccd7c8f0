"""The shared encoder: tokenizer plus ONNX Runtime session, batched by token budget.

The session runs one variant of the encoder (fp32, int8 or fp16, chosen by
`model.variants.select_variant`); all variants take and give the same tensors,
so nothing after the session depends on the variant. On CUDA, inputs and outputs go
through an I/O binding; on CPU the plain `run` is used.

ONNX Runtime lists CUDA whenever the GPU wheel is installed, and a session whose CUDA
provider cannot start (no driver, a missing cuDNN) quietly runs on CPU. So the providers
the session really runs are checked against the request (`check_providers`): when the
settings ask for a GPU (TASKMUX_PROVIDERS naming it, or the fp16 variant) and it is not
what runs, the worker refuses to start (ProviderError); with "auto" it runs on CPU and
says so.

On a CPU the encoder may also hold single-thread replicas of its sessions
(`model/replicas.py`): a big batch is cut into contiguous slices run at once, one per
replica, and small batches keep the multi-thread session. A lone small batch may run on
a second copy of that session whose threads spin within a run, when timing says that is
faster (`model/spin.py`).
"""

from __future__ import annotations

import copy as _copy
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from model.manifest import EMBEDDING, EncoderSpec
from model.parts import (
    TRUNK,
    BranchOutput,
    BranchSessions,
    Collector,
    Features,
    Feeds,
    Graphs,
    Want,
)
from model.replicas import MIN_REPLICA_ROWS, Replicas, physical_cores, replica_count, slices
from model.spin import SpinChooser, SpinInRun
from model.variants import (
    AUTO,
    CPU,
    FP16,
    FP32,
    GPU_PROVIDERS,
    Selection,
    select_variant,
    variant_parts,
)

log = logging.getLogger(__name__)

# Real tokens / padded tokens below which a batch is split (see _chunks).
MIN_PADDING_EFFICIENCY = 0.8

Floats = npt.NDArray[np.float32]


class ProviderError(RuntimeError):
    """The ONNX Runtime providers the settings ask for are not what runs the session."""


def is_auto(requested: Sequence[str]) -> bool:
    """Whether `requested` leaves the providers to the worker ("auto" or nothing)."""
    return list(requested) in ([], [AUTO])


def choose_providers(requested: Sequence[str]) -> list[str]:
    """Execution providers to ask ONNX Runtime for; "auto" means CUDA if present, else CPU.

    Raises ProviderError when a provider named explicitly is not in this ONNX Runtime.
    """
    available = ort.get_available_providers()
    if is_auto(requested):
        wanted = ["CUDAExecutionProvider", CPU]
        return [p for p in wanted if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise ProviderError(
            f"TASKMUX_PROVIDERS asks for {missing}, which this ONNX Runtime "
            f"{ort.__version__} does not have (it has {available}): install the GPU wheel "
            "(onnxruntime-gpu) and its CUDA libraries, or set TASKMUX_PROVIDERS=auto "
            "to run on CPU"
        )
    return list(requested)


def check_providers(
    requested: Sequence[str], variant: str, selection: Selection, active: Sequence[str]
) -> bool:
    """Whether the session runs the provider the selection asked for first.

    Raises ProviderError when it does not and the settings require it: providers named
    explicitly (not "auto"), or the fp16 variant, which needs a GPU. False means "auto"
    asked for a GPU that did not start: the caller falls back to CPU.
    """
    wanted = selection.providers[0]
    if active and active[0] == wanted:
        return True
    if is_auto(requested) and variant != FP16:
        return False
    why = "TASKMUX_PROVIDERS names it" if not is_auto(requested) else "encoder variant fp16"
    raise ProviderError(
        f"ONNX Runtime was asked for {selection.providers} ({why}) but runs the session on "
        f"{list(active)}: the {wanted} provider did not start (for CUDA: check the driver, "
        "the CUDA and cuDNN libraries onnxruntime-gpu needs, and that a GPU is visible to "
        "the container). Fix that, or set TASKMUX_PROVIDERS=auto and "
        "TASKMUX_ENCODER_VARIANT=auto to run on CPU"
    )


@dataclass(frozen=True)
class BranchRows:
    """The rows of an `encode_full` call that need a branch: its pooled vectors (`pooled`)
    or also its per-token states (`tokens`)."""

    pooled: Collection[int]
    tokens: Collection[int] = ()


@dataclass(frozen=True)
class Encoded:
    """Everything one encoder pass over a list of texts produced, in input order."""

    pooled: Floats  # [texts, dim] mean-pooled, not normalised (embedding branch)
    encodings: list[Encoding]  # tokens, offsets and word ids of each text
    token_states: dict[int, Floats]  # [tokens, dim] per text asked for, incl. [CLS]/[SEP]
    stats: EncodeStats
    # Every branch computed, by name ("embedding" is `pooled` and `token_states`).
    branches: dict[str, Features] = field(default_factory=dict)

    def features(self, branch: str) -> Features:
        """One branch's outputs (KeyError when this pass did not compute it)."""
        return self.branches[branch]


@dataclass(frozen=True)
class EncodeStats:
    """What one `encode` call computed, for padding-efficiency figures."""

    rows: int
    real_tokens: int
    padded_tokens: int
    batches: int


class Encoder:
    """Turns texts into mean-pooled sentence vectors with one ONNX Runtime session."""

    def __init__(
        self,
        repo: Path,
        spec: EncoderSpec,
        *,
        providers: Sequence[str] = ("auto",),
        intra_op_threads: int = 0,
        variant: str = FP32,
        spin: bool = False,
        spin_in_run: SpinInRun = "off",
        replicas: int = 1,
    ) -> None:
        """Load `variant` ("auto", "fp32", "int8" or "fp16") of the encoder.

        `replicas` single-thread copies of the sessions run big batches in slices at once
        on a CPU (0: one per thread of the main session, 1: none; never on a GPU); they
        own threads, which `close` stops. `spin`: idle threads busy-wait between runs;
        `spin_in_run`: "on" only within a run (see `_session_options`), "auto" whenever
        that has been faster lately (`model/spin.py`; a CPU with more than one thread).

        Raises VariantError (a ModelRepoError) when that variant cannot run here, and
        ProviderError when the providers the settings require are not what runs it.
        """
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(repo / spec.tokenizer_file))
        # The packaged tokenizer pads every text to a fixed length; we pad per batch.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=spec.max_sequence_length)
        options = _session_options(intra_op_threads, spin, spin_in_run == "on")
        selection = select_variant(variant, spec, choose_providers(providers))
        self._repo, self._options = repo, options
        self._single = _session_options(1, spin, spin_in_run == "on")
        self.session = self._open(selection.parts.get(TRUNK, selection.file), selection)
        active = self.session.get_providers()
        if not check_providers(providers, variant, selection, active):
            log.warning(
                "the %s provider did not start (ONNX Runtime runs %s): falling back to CPU",
                selection.providers[0],
                active,
            )
            cpu = select_variant(variant, spec, [CPU])
            if cpu.file != selection.file:
                self.session = self._open(cpu.parts.get(TRUNK, cpu.file), cpu)
            selection = cpu
        self._selection = selection
        # A split encoder: `session` is its trunk, and each branch has its own session.
        self.parts: BranchSessions | None = None
        if selection.parts:
            names = [n for n in selection.parts if n != TRUNK]
            branches = {n: self._open(selection.parts[n], selection) for n in names}
            self.parts = BranchSessions(self.session, branches)
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.provider = self.session.get_providers()[0]
        self.variant = selection.variant
        # Output device of the I/O binding; None runs the plain (CPU) path.
        self._bind_device = "cuda" if self.provider in GPU_PROVIDERS else None
        self.branch_names = sorted(self.parts.branches) if self.parts else [EMBEDDING]
        self.replicas = self._open_replicas(replicas, intra_op_threads)
        # The multi-thread sessions again, spinning within a run, for `SpinChooser`.
        self._spin_options = _session_options(intra_op_threads, False, True)
        self._spinning: Graphs | None = None
        self._chooser: SpinChooser | None = None
        if spin_in_run == "auto" and not spin and self._chooses_spin(intra_op_threads):
            self._spinning = self._open_graphs(self._spin_options)
            self._chooser = SpinChooser()
        spinning = "when faster" if self._chooser else "on" if spin_in_run == "on" else "off"
        log.info(
            "encoder %s variant %s (%s) on %s, %s single-thread replicas, threads spin "
            "within a run: %s",
            spec.name,
            self.variant,
            selection.reason,
            self.provider,
            len(self.replicas.copies) if self.replicas else "no",
            spinning,
        )

    def with_branches(self, spec: EncoderSpec) -> Encoder:
        """A copy of this encoder serving `spec`, which differs from its own in heads'
        branches only (`EncoderSpec.same_graphs`): sessions of the parts both have are
        shared, new branches are opened in the same variant and on the same providers.
        This object is untouched, so batches computing on it finish on it."""
        if not spec.same_graphs(self.spec) or self.parts is None:
            raise ValueError("only heads' branches of a split encoder can change while serving")
        files = {n: p.file for n, p in variant_parts(spec, self.variant).items()}
        copy = _copy.copy(self)
        copy.spec = spec
        copy._selection = replace(self._selection, parts=files)
        copy.parts = self._branches(self.parts, files, self._options)
        copy.branch_names = sorted(copy.parts.branches)
        if self.replicas is not None:
            copy.replicas = self.replicas.with_copies(
                [
                    Graphs(g.main, self._branches(g.parts, files, self._single))
                    for g in self.replicas.copies
                    if g.parts is not None
                ]
            )
        if self._spinning is not None and self._spinning.parts is not None:
            parts = self._branches(self._spinning.parts, files, self._spin_options)
            copy._spinning = Graphs(self._spinning.main, parts)
        return copy

    def _branches(
        self, parts: BranchSessions, files: Mapping[str, str], options: ort.SessionOptions
    ) -> BranchSessions:
        """`parts` serving `files`: the sessions of the files both have are kept."""
        mine = self._selection.parts
        branches = {
            name: parts.branches[name] if mine.get(name) == file else (
                self._open(file, self._selection, options)
            )
            for name, file in files.items()
            if name != TRUNK
        }  # fmt: skip
        return BranchSessions(parts.trunk, branches)

    def _open(
        self, file: str, selection: Selection, options: ort.SessionOptions | None = None
    ) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(self._repo / file), options or self._options, providers=selection.providers
        )

    def _open_replicas(self, requested: int, intra_op_threads: int) -> Replicas | None:
        count = replica_count(requested, intra_op_threads)
        if self.provider != CPU or count < 2:
            return None
        return Replicas([self._open_graphs(self._single) for _ in range(count)])

    def _chooses_spin(self, intra_op_threads: int) -> bool:
        """Whether there is a choice: a CPU session with more than one thread."""
        return self.provider == CPU and (intra_op_threads or physical_cores()) > 1

    def _open_graphs(self, options: ort.SessionOptions) -> Graphs:
        """Another copy of the selected variant's sessions, opened with `options`."""
        parts, selection = self._selection.parts, self._selection
        main = self._open(parts.get(TRUNK, selection.file), selection, options)
        if not parts:
            return Graphs(main, None)
        names = [n for n in parts if n != TRUNK]
        branches = {n: self._open(parts[n], selection, options) for n in names}
        return Graphs(main, BranchSessions(main, branches))

    def close(self) -> None:
        """Stop the replicas' threads, shared with the copies `with_branches` made: call it
        once none of them encodes any more."""
        if self.replicas is not None:
            self.replicas.close()

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_batch_tokens: int = 16384,
        max_batch_rows: int = 128,
        min_padding_efficiency: float = MIN_PADDING_EFFICIENCY,
        branch: str = EMBEDDING,
    ) -> tuple[Floats, EncodeStats]:
        """Mean-pooled vectors (not normalised) of `branch`, one row per text, in input order."""
        encoded = self.encode_full(
            texts,
            max_batch_tokens=max_batch_tokens,
            max_batch_rows=max_batch_rows,
            min_padding_efficiency=min_padding_efficiency,
            branches={branch: BranchRows(range(len(texts)))},
        )
        return encoded.features(branch).pooled, encoded.stats

    def encode_full(
        self,
        texts: Sequence[str],
        *,
        token_rows: Collection[int] = (),
        max_batch_tokens: int = 16384,
        max_batch_rows: int = 128,
        min_padding_efficiency: float = MIN_PADDING_EFFICIENCY,
        encodings: Mapping[str, Encoding] | None = None,
        branches: Mapping[str, BranchRows] | None = None,
        alone: bool = False,
    ) -> Encoded:
        """One pass: pooled vectors for all texts, per-token states for `token_rows`.

        Texts are sorted by token length and cut into batches whose padded size
        (rows x longest) stays within `max_batch_tokens`, so little work goes to padding.
        Token heads read the states of this same pass; nothing is encoded twice.
        `encodings` are texts this tokenizer already tokenized (the worker does it early
        to size its batches); the rest are tokenized here. `branches` names the rows each
        branch computes (default: the embedding branch for every row, tokens for
        `token_rows`); the trunk of a split encoder runs once for all of them.
        `alone`: a caller waits on this pass with nothing else for the cores to do (a
        worker's lone small batch), so the multi-thread session may spin within its runs
        (`model/spin.py`); under load the cores spinning would take belong to others.
        """
        known = encodings or {}
        missing = [t for t in texts if t not in known]
        fresh = dict(zip(missing, self.tokenizer.encode_batch(missing), strict=True))
        tokens = [known[t] if t in known else fresh[t] for t in texts]
        if branches is None:
            branches = {EMBEDDING: BranchRows(range(len(texts)), token_rows)}
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].ids))
        outputs = {name: Collector(len(texts), self.spec.dimension) for name in branches}
        pooled_rows = {name: set(rows.pooled) | set(rows.tokens) for name, rows in branches.items()}
        token_sets = {name: set(rows.tokens) for name, rows in branches.items()}

        def run(graphs: Graphs, rows: list[int]) -> dict[str, BranchOutput]:
            wants = {
                name: Want(
                    [k for k, i in enumerate(rows) if i in pooled_rows[name]],
                    any(i in token_sets[name] for i in rows),
                )
                for name in branches
            }
            return self._run(graphs, [tokens[i] for i in rows], wants)

        real = padded = batches = 0
        for chunk in _chunks(
            order, tokens, max_batch_tokens, max_batch_rows, min_padding_efficiency
        ):
            batch = [tokens[i] for i in chunk]
            lengths = [len(e.ids) for e in batch]
            for rows, result in self._run_chunk(chunk, lengths, run, alone=alone):
                for name, out in result.items():
                    if out.pooled.shape[0] != len(out.rows):
                        raise RuntimeError(
                            f"encoder returned {out.pooled.shape[0]} rows for {len(out.rows)}"
                        )
                    outputs[name].add(rows, out, token_sets[name], tokens)
            real += sum(len(e.ids) for e in batch)
            padded += len(batch) * max(len(e.ids) for e in batch)
            batches += 1
        features = {name: c.features() for name, c in outputs.items()}
        main = features.get(EMBEDDING) or Features(
            np.zeros((len(texts), self.spec.dimension), dtype=np.float32), {}
        )
        stats = EncodeStats(len(texts), real, padded, batches)
        return Encoded(main.pooled, tokens, main.token_states, stats, features)

    def encode_tokens(
        self, texts: Sequence[str], *, max_batch_tokens: int = 16384, branch: str = EMBEDDING
    ) -> list[tuple[Floats, Encoding]]:
        """Per-token states of `branch` and the encoding of each text (for token heads and
        training)."""
        rows = range(len(texts))
        encoded = self.encode_full(
            texts, max_batch_tokens=max_batch_tokens, branches={branch: BranchRows(rows, rows)}
        )
        states = encoded.features(branch).token_states
        return [(states[i], encoded.encodings[i]) for i in rows]

    def _run_chunk(
        self,
        chunk: list[int],
        lengths: list[int],
        run: Callable[[Graphs, list[int]], dict[str, BranchOutput]],
        *,
        alone: bool,
    ) -> list[tuple[list[int], dict[str, BranchOutput]]]:
        """`run` over the chunk's rows: at once on the multi-thread session when it is
        small, else in contiguous slices (lengths ascend) at once, one per replica."""
        if self.replicas is None or len(chunk) < MIN_REPLICA_ROWS:
            padded = len(chunk) * max(lengths)
            return [(chunk, self._run_multi_thread(chunk, padded, run, alone=alone))]
        pieces = [chunk[s] for s in slices(lengths, len(self.replicas.copies))]
        return list(zip(pieces, self.replicas.map(run, pieces), strict=True))

    def _run_multi_thread(
        self,
        chunk: list[int],
        padded: int,
        run: Callable[[Graphs, list[int]], dict[str, BranchOutput]],
        *,
        alone: bool,
    ) -> dict[str, BranchOutput]:
        """`run` on the multi-thread session; a batch run `alone` spins within the run or
        not as `SpinChooser` says."""
        if not alone or self._chooser is None or self._spinning is None:
            return run(Graphs(self.session, self.parts), chunk)
        spin = self._chooser.spin(padded)
        start = time.perf_counter()
        result = run(self._spinning if spin else Graphs(self.session, self.parts), chunk)
        self._chooser.record(padded, spin, time.perf_counter() - start)
        return result

    def _run(
        self, graphs: Graphs, batch: list[Encoding], wants: Mapping[str, Want]
    ) -> dict[str, BranchOutput]:
        width = max(len(e.ids) for e in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, enc in enumerate(batch):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = enc.attention_mask
            types[row, :n] = enc.type_ids
        feeds: Feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if graphs.parts is not None:
            return graphs.parts.run(feeds, [len(e.ids) for e in batch], wants, self._outputs)
        unknown = wants.keys() - {EMBEDDING}
        if unknown:
            raise KeyError(f"the encoder has no {sorted(unknown)} branch (a single graph)")
        want = wants.get(EMBEDDING)
        if want is None or not want.rows:
            return {}
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        names = ["pooled", "token_embeddings"] if want.tokens else ["pooled"]
        outputs = self._outputs(graphs.main, feeds, names)
        rows = list(range(len(batch)))
        pooled = np.asarray(outputs[0], dtype=np.float32)
        states = np.asarray(outputs[1], dtype=np.float32) if want.tokens else None
        return {EMBEDDING: BranchOutput(rows, pooled, states)}

    def _outputs(
        self, session: ort.InferenceSession, feeds: Feeds, names: list[str]
    ) -> list[npt.NDArray[np.float32]]:
        if self._bind_device is None:
            result: list[npt.NDArray[np.float32]] = session.run(names, feeds)
            return result
        return run_bound(session, feeds, names, self._bind_device)


def run_bound(
    session: ort.InferenceSession,
    feeds: Feeds,
    names: list[str],
    device: str,
) -> list[npt.NDArray[np.float32]]:
    """`session.run(names, feeds)` through an I/O binding, outputs allocated on `device`.

    Each input goes to the device once and only the named outputs come back, each in one
    copy. While heads run in numpy the gain over `run` is small; this is where outputs
    would stay on the device if heads moved to the GPU.
    """
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name in names:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    outputs: list[npt.NDArray[np.float32]] = binding.copy_outputs_to_cpu()
    return outputs


def _session_options(intra_op_threads: int, spin: bool, spin_in_run: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # 0: ONNX Runtime's default, one thread per physical core.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's idle threads busy-wait for the next call by default. A worker
    # shares its cores with the gateway and Redis, and between batches that spinning
    # takes the CPU they need to hand it the next batch (bench/ab.py, c=64: 1.45x).
    # Within one run, though, a thread that sleeps between two operators' parallel parts
    # costs a wake-up each time (bench/ab.py on a quiet machine: c=1 p50 -0.98 ms with
    # spinning in a run), so `spin_in_run` lets them spin while a run lasts and stop when
    # it returns.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if spin or spin_in_run else "0"
    )
    if spin_in_run and not spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def l2_normalize(vectors: Floats) -> Floats:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Floats = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def _chunks(
    order: list[int],
    encodings: list[Encoding],
    max_tokens: int,
    max_rows: int,
    min_efficiency: float = MIN_PADDING_EFFICIENCY,
) -> list[list[int]]:
    """Split indices (sorted by length, ascending) into batches within the token budget.

    A batch also closes when padding the next text's length onto it would waste more
    than a fifth of its tokens: on a CPU, padded positions cost as much as real ones
    (attention more), so several well-filled calls beat one ragged call.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = len(encodings[i].ids)  # the longest so far, since lengths ascend
        rows = len(current) + 1
        ragged = (real + width) < min_efficiency * rows * width
        if current and (rows * width > max_tokens or rows > max_rows or ragged):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += width
    if current:
        chunks.append(current)
    return chunks
