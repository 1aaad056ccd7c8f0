"""The encoder cut in two at a layer: a shared trunk and the branches that sit on it (torch).

`Trunk` is the embeddings and the lower `branch_layer` transformer layers; a `Branch` is the
upper layers followed by mean pooling over the attention mask. The embedding branch keeps
the original upper layers, so trunk + embedding branch is exactly the original encoder; the
multi-task branch is a copy of them fine-tuned jointly with the trained heads. Both graphs
are exported to ONNX from these modules (`multitask_export.py`), and training runs them too
(`multitask.py`), so what is trained is what is served. Only model tooling imports this.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.encoder import Floats


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, 1, seq]: 0 where attended, the dtype's minimum where padded."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class Layers(torch.nn.Module):
    """A run of BERT layers over hidden states."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__()
        self.layer = torch.nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layer:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class Trunk(torch.nn.Module):
    """Token ids to the hidden states at the branch point."""

    def __init__(self, bert: Any, branch_layer: int) -> None:
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = Layers(list(bert.encoder.layer[:branch_layer]))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        result: torch.Tensor = self.layers(hidden, attention_mask)
        return result


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    pooled: torch.Tensor = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return pooled


class Branch(torch.nn.Module):
    """Hidden states at the branch point to (token states, mean-pooled vector)."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__()
        self.layers = Layers(layers)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.layers(hidden, attention_mask)
        return states, mean_pool(states, attention_mask)


def load_bert(model_dir: Path) -> Any:
    """The packaged encoder (a local folder: nothing is downloaded), in eval mode."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")  # nosec B615
    model.eval()
    return model


def cut(bert: Any, branch_layer: int) -> tuple[Trunk, Branch]:
    """The trunk, and the embedding branch (the original upper layers, shared with `bert`)."""
    layers = len(bert.encoder.layer)
    if not 0 < branch_layer < layers:
        raise ValueError(f"branch layer {branch_layer} is not inside the {layers} layers")
    return Trunk(bert, branch_layer), Branch(list(bert.encoder.layer[branch_layer:]))


def copy_branch(branch: Branch) -> Branch:
    """An independent copy of a branch (the multi-task branch starts as this)."""
    return copy.deepcopy(branch)


def branch_arrays(branch: Branch) -> dict[str, Floats]:
    """The branch's parameters as float16 arrays (what is committed)."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float16)
        for name, tensor in branch.state_dict().items()
    }


def load_branch_arrays(branch: Branch, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    """Set a branch's parameters from `branch_arrays` output; every key must match."""
    state = {name: torch.from_numpy(np.asarray(v, dtype=np.float32)) for name, v in arrays.items()}
    branch.load_state_dict(state, strict=True)
