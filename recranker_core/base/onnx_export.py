"""ONNX export of a base model as a top-N scorer: user indices (and, for sequence models, their
padded item sequences) plus the items to exclude go in; the top-N item indices and scores come
out, with the masking and TopK inside the graph. Exported once, against the scoring module every
model provides, checked for parity with torch, and run by ONNX Runtime (CUDA when available)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ArtifactIntegrityError

if TYPE_CHECKING:
    import onnxruntime
    import torch

log = logging.getLogger(__name__)

INPUT_USERS = "users"
INPUT_EXCLUDE = "exclude"
INPUT_SEQUENCES = "sequences"
OUTPUT_SCORES = "scores"
OUTPUT_ITEMS = "items"


def _topk_module(scoring: torch.nn.Module, n_items: int, k: int, with_sequences: bool) -> Any:
    import torch

    class TopKScorer(torch.nn.Module):
        """Scores -> excluded items at -inf -> top k. `exclude` is padded with -1."""

        def __init__(self) -> None:
            super().__init__()
            self.scoring = scoring

        def _mask_and_rank(
            self, scores: torch.Tensor, exclude: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # Padding (-1) is sent to an extra column that is dropped again, so one scatter
            # masks every row whatever its number of excluded items.
            extra = torch.zeros_like(scores[:, :1])
            widened = torch.cat([scores, extra], dim=1)
            target = torch.where(exclude < 0, torch.full_like(exclude, n_items), exclude)
            masked = widened.scatter(
                1, target, torch.full_like(target, 0, dtype=scores.dtype) - float("inf")
            )
            values, indices = torch.topk(masked[:, :n_items], k, dim=1)
            return values, indices

        def forward(self, users: torch.Tensor, exclude: torch.Tensor, *rest: torch.Tensor) -> Any:
            scores = self.scoring(users, *rest)
            return self._mask_and_rank(scores, exclude)

    return TopKScorer().eval()


@dataclass(frozen=True)
class ExportReport:
    path: Path
    k: int
    n_items: int
    with_sequences: bool
    parity_max_abs_diff: float
    parity_users: int


def export_topk(
    scoring: torch.nn.Module,
    n_items: int,
    path: Path,
    *,
    k: int = 10,
    sequence_len: int | None = None,
    parity_users: npt.NDArray[np.int64] | None = None,
    parity_exclude: npt.NDArray[np.int64] | None = None,
    parity_sequences: npt.NDArray[np.int64] | None = None,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Export `scoring` (users[, sequences] -> scores [B, n_items]) as a top-k ONNX scorer and
    check it against torch on the parity sample; raise ArtifactIntegrityError past `tolerance`.

    Scores are compared, not indices: tied items may come out in a different order.
    """
    import torch

    with_sequences = sequence_len is not None
    module = _topk_module(scoring, n_items, k, with_sequences)
    batch = torch.export.Dim("batch", min=1)
    width = torch.export.Dim("exclude_width", min=1)
    users = torch.zeros(2, dtype=torch.int64)
    exclude = torch.full((2, 3), -1, dtype=torch.int64)
    args: tuple[torch.Tensor, ...] = (users, exclude)
    dynamic: dict[str, dict[int, Any]] = {"users": {0: batch}, "exclude": {0: batch, 1: width}}
    input_names = [INPUT_USERS, INPUT_EXCLUDE]
    if with_sequences:
        assert sequence_len is not None
        args = (*args, torch.zeros(2, sequence_len, dtype=torch.int64))
        dynamic["rest"] = ({0: batch},)  # type: ignore[assignment]
        input_names.append(INPUT_SEQUENCES)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=input_names,
        output_names=[OUTPUT_SCORES, OUTPUT_ITEMS],
        dynamic_shapes=dynamic,
        dynamo=True,
        external_data=False,
    )
    diff = 0.0
    n_parity = 0
    if parity_users is not None:
        exclude_np = (
            parity_exclude
            if parity_exclude is not None
            else np.full((parity_users.size, 1), -1, dtype=np.int64)
        )
        inputs = [parity_users.astype(np.int64), exclude_np.astype(np.int64)]
        if with_sequences:
            assert parity_sequences is not None
            inputs.append(parity_sequences.astype(np.int64))
        with torch.no_grad():
            expected, _ = module(*(torch.from_numpy(a) for a in inputs))
        got, _ = OnnxScorer(path).run(*inputs)
        finite = np.isfinite(expected.numpy())
        diff = float(np.max(np.abs(expected.numpy()[finite] - got[finite]), initial=0.0))
        n_parity = int(parity_users.size)
        if diff > tolerance or not np.array_equal(finite, np.isfinite(got)):
            raise ArtifactIntegrityError(
                f"{path}: ONNX scores differ from torch by {diff:.2e} (tolerance {tolerance:.0e}) "
                f"on {n_parity} users; the export is not used"
            )
        log.info("ONNX parity on %d users: max |diff| %.2e", n_parity, diff)
    return ExportReport(path, k, n_items, with_sequences, diff, n_parity)


def providers() -> list[str]:
    """CUDA when ONNX Runtime has it and a device answers, else CPU.

    onnxruntime-gpu lists the CUDA provider even on a machine without CUDA libraries, and
    asking for it there logs errors before falling back; so a device must answer first.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_device() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; serving may drop it one day
        return False
    return bool(torch.cuda.is_available())


class OnnxScorer:
    """An ONNX Runtime session over an exported top-k scorer."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session: onnxruntime.InferenceSession = ort.InferenceSession(
            str(path), sess_options=options, providers=providers()
        )
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        log.info("ONNX Runtime scorer %s on %s", path.name, self.provider)

    def run(
        self, users: npt.NDArray[np.int64], exclude: npt.NDArray[np.int64], *sequences: Any
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        feeds = dict(zip(self.input_names, (users, exclude, *sequences), strict=False))
        scores, items = self.session.run([OUTPUT_SCORES, OUTPUT_ITEMS], feeds)
        return scores, items


def pad_exclusions(lists: list[npt.NDArray[np.integer]]) -> npt.NDArray[np.int64]:
    """Per-user excluded items as a [B, max_len] array padded with -1 (at least one column)."""
    width = max((len(x) for x in lists), default=0) or 1
    out = np.full((len(lists), width), -1, dtype=np.int64)
    for row, items in enumerate(lists):
        out[row, : len(items)] = items
    return out
