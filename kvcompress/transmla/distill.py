"""Recovery training of a converted model: distillation from the source model's next-token distributions."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import text_config
from .calibration import _as_token_batch
from .checks import check_bool, check_int, check_positive_float
from .source import _eval_mode


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
    warning says how many). The student is left in eval mode; ``requires_grad`` flags are restored. The
    teacher runs in eval mode (no dropout) and is left as it was.

    Args:
        student: the model to train (e.g. from :func:`convert_gqa_to_mla`).
        teacher: the reference model (e.g. the conversion's source); shares no parameters with ``student``
            and has the same ``vocab_size``.
        tokens: token ids ``[sequences, tokens]`` (or a list of equal-length 1-D tensors) in the vocabulary.
        steps: AdamW steps, an int >= 1.
        lr: AdamW learning rate, a finite float > 0.
        temperature: softmax temperature of both distributions, a finite float > 0.
        batch_size: rows of ``tokens`` per step, an int >= 1.
        progress: show a tqdm bar.

    Returns:
        The loss of every step done.

    Raises:
        TypeError: ``student``/``teacher`` not modules, ``tokens`` not a tensor or list of tensors.
        ValueError: any other argument out of range (checked before any work).
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name} must be a causal LM (torch.nn.Module), got {type(model).__name__}")
    if student is teacher:
        raise ValueError("student and teacher must be two different models (the teacher is not trained)")
    steps = check_int("steps", steps, 1)
    lr = check_positive_float("lr", lr)
    temperature = check_positive_float("temperature", temperature)
    batch_size = check_int("batch_size", batch_size, 1)
    progress = check_bool("progress", progress)
    vocab = [getattr(text_config(model), "vocab_size", None) for model in (student, teacher)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise ValueError(f"student and teacher must share a vocabulary: vocab_size {vocab[0]} and {vocab[1]}")
    tokens = _as_token_batch(tokens, "tokens", vocab[0] if vocab[0] is not None else vocab[1])
    if not any(".self_attn." in name and "layernorm" not in name for name, _ in student.named_parameters()):
        raise ValueError(f"student ({type(student).__name__}) has no attention projections (.self_attn.) to train")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(f"student and teacher must share no parameters (the teacher is not trained); {len(shared)} shared")
    device = next(student.parameters()).device
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    losses: list[float] = []
    with _eval_mode(teacher):  # deterministic targets: no dropout in the teacher
        try:
            trained = []
            for name, p in student.named_parameters():
                train = ".self_attn." in name and "layernorm" not in name
                p.requires_grad_(train)
                if train:
                    trained.append(p)
            optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
            student.train()
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
