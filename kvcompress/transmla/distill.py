"""Recovery training of a converted model: distillation from the source model's next-token distributions."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import _as_token_batch


def distill_from_teacher(
    student,
    teacher,
    tokens: torch.Tensor,
    steps: int = 50,
    lr: float = 1e-4,
    temperature: float = 1.0,
    batch_size: int = 1,
    progress: bool = True,
) -> list[float]:
    r"""Recovery training: minimise :math:`\mathrm{KL}(p_\text{teacher} \,\|\, p_\text{student})` of the
    next-token distributions (at ``temperature``), averaged over tokens, for ``steps`` AdamW steps.

    Only the student's attention projections train (``q_proj``/``q_a_proj``/``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``); the norms, MLPs and embeddings stay frozen. Step
    ``s`` uses rows ``s * batch_size, ...`` (cyclically) of ``tokens``. Ctrl-C stops early and keeps the steps done (a
    warning says how many). The student is left in eval mode; ``requires_grad`` flags are restored.

    Returns:
        The loss of every step done.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    tokens = _as_token_batch(tokens)
    device = next(student.parameters()).device
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    trained = []
    for name, p in student.named_parameters():
        train = ".self_attn." in name and "layernorm" not in name
        p.requires_grad_(train)
        if train:
            trained.append(p)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    student.train()
    try:
        for step in tqdm(range(steps), desc="recovery distillation", disable=not progress):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(tokens)
            row = tokens[rows].to(device)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=row, use_cache=False).logits.float() / temperature, -1)
            logits = student(input_ids=row, use_cache=False).logits.float() / temperature
            loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                            reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    except KeyboardInterrupt:
        warnings.warn(f"recovery distillation interrupted after {len(losses)} of {steps} steps", stacklevel=2)
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
        student.eval()
    return losses
