r"""Recovery training of a converted model: distillation from the source model.

The loss of one batch, over its ``N`` tokens and the ``L`` layers, with ``p`` the teacher's and ``q`` the
student's next-token distributions at temperature ``T``, ``h_l`` the hidden state after layer ``l`` and
``a_l`` the output of layer ``l``'s attention block (after ``o_proj``):

.. math::

    \mathcal{L} = w_\text{KL} \frac{1}{N} \sum_t \mathrm{KL}(p_t \,\|\, q_t)
        + \frac{w_h}{L} \sum_l \frac{\|h^S_l - h^T_l\|^2}{\|h^T_l\|^2}
        + \frac{w_a}{L} \sum_l \frac{\|a^S_l - a^T_l\|^2}{\|a^T_l\|^2}

(norms over the whole batch). The KL term is the logit distillation of X-EcoMLA (Li et al., 2025); the two
per-layer terms match the student's internal states to the teacher's, each layer's error relative to the
teacher's own energy there, so layers with large activations do not dominate. Both models run on their own
inputs (the student's layer ``l`` sees the student's residual stream), so the per-layer terms measure how
far the student has drifted by layer ``l``, errors of earlier layers included.

Training is resumable: the state after step ``s`` is the trainable weights, the optimizer's moments, the
step count and the RNG states; the batch of step ``s`` is a function of ``s`` (and ``seed``) alone, so a run
continued from a checkpoint takes exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import PatchHandle, wrap_forward
from ..models import text_config
from .calibration import _as_token_batch
from .checks import check_bool, check_int, check_positive_float
from .source import _eval_mode

TRAIN_CHOICES = ("attention", "attention+mlp", "all")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_FILE = "distill_checkpoint.pt"
_CHECKPOINT_FORMAT = 1
_COSINE_FLOOR = 0.1  # the cosine schedule ends at 10% of lr rather than 0, so the last steps still move


def _trained(name: str, train: str) -> bool:
    """Whether parameter ``name`` trains under ``train`` (see :data:`TRAIN_CHOICES`)."""
    if train == "all":
        return True
    # kv_a_layernorm / q_a_layernorm hold the norm anchor's constant: left as built
    attention = ".self_attn." in name and "layernorm" not in name
    return attention or (train == "attention+mlp" and ".mlp." in name)


def _check_weight(name: str, value: object) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def _lr_at(step: int, lr: float, steps: int, schedule: str, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps, then constant or a
    half cosine from ``lr`` down to ``_COSINE_FLOOR * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(steps - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return lr * (_COSINE_FLOOR + (1 - _COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_rows(step: int, batch_size: int, rows: int, shuffle: bool, seed: int, perms: dict) -> torch.Tensor:
    """Rows of step ``step``: positions ``step * batch_size ...`` of the sequence of epochs, each epoch the
    rows in order or (``shuffle``) in a permutation drawn from ``seed`` and the epoch number alone."""
    index = torch.arange(step * batch_size, (step + 1) * batch_size)
    if not shuffle:
        return index % rows
    out = torch.empty_like(index)
    for n, i in enumerate(index.tolist()):
        epoch = i // rows
        if epoch not in perms:
            perms[epoch] = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out[n] = perms[epoch][i % rows]
    return out


@contextmanager
def _uninterrupted():
    """Inside, Ctrl-C is held back until the block ends: an optimizer step cut half-way would leave weights
    that neither the step before nor the step after describes. Only the main thread receives signals, so
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _fingerprint(tokens: torch.Tensor, names: list[str], settings: dict) -> dict:
    """What a checkpoint must agree on to be continued: the data, the trained parameters, the settings."""
    weights = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float64)
    digest = float((tokens.double() * weights).sum()) + float(tokens.double().pow(2).sum())
    return {"tokens_shape": list(tokens.shape), "tokens_digest": digest, "trained": names, **settings}


def _save_checkpoint(directory: Path, trained: dict, optimizer, step: int, losses: list, fingerprint: dict) -> None:
    """Write the state after ``step`` steps to ``directory/CHECKPOINT_FILE`` atomically: a temporary file
    renamed over the old one, so an interruption during the write leaves the previous checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": _CHECKPOINT_FORMAT, "step": step, "losses": list(losses), "fingerprint": fingerprint,
        "params": {name: p.detach().cpu().clone() for name, p in trained.items()},
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.random.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    target = directory / CHECKPOINT_FILE
    partial = directory / (CHECKPOINT_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, target)


def _load_checkpoint(directory: Path, trained: dict, optimizer, fingerprint: dict) -> tuple[int, list[float]]:
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / CHECKPOINT_FILE}: unknown checkpoint format {state.get('format')!r}")
    saved = state["fingerprint"]
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}"
                          for k in differ if k != "trained")
        raise ValueError(f"resume=True: the checkpoint in {directory} is of another run ({', '.join(differ)} "
                         f"differ{': ' + shown if shown else ''}); use another checkpoint_dir or resume=False")
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(state["params"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    torch.random.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available() and len(state["rng_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-30)


def distill_from_teacher(
    student,
    teacher,
    tokens: torch.Tensor,
    steps: int | None = None,
    lr: float = 1e-4,
    temperature: float = 1.0,
    batch_size: int = 1,
    progress: bool = True,
    *,
    token_budget: int | None = None,
    kl_weight: float = 1.0,
    hidden_weight: float = 0.0,
    attention_weight: float = 0.0,
    train: str = "attention",
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    shuffle: bool = False,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> list[float]:
    r"""Recovery training of ``student`` against ``teacher`` with AdamW (weight decay 0).

    The loss (module docstring) is ``kl_weight`` times :math:`\mathrm{KL}(p_\text{teacher} \,\|\,
    p_\text{student})` of the next-token distributions at ``temperature``, averaged over tokens, plus
    ``hidden_weight`` times the per-layer relative hidden-state error and ``attention_weight`` times the
    per-layer relative error of the attention blocks' outputs (both averaged over layers). Only
    the parameters chosen by ``train`` change. Step ``s`` uses rows ``s * batch_size, ...`` (cyclically) of
    ``tokens``, or of a fresh permutation of them per pass when ``shuffle``. Ctrl-C stops after the step in
    progress is finished or dropped, keeps the steps done (a warning says how many) and, with
    ``checkpoint_dir``, writes a checkpoint of them. The student is left in eval mode with its
    ``requires_grad`` flags as they were; the teacher runs in eval mode (no dropout) and is left as it was.

    Checkpoints: with ``checkpoint_dir``, the trained parameters, the optimizer state, the step count,
    the losses so far and the RNG states go to ``checkpoint_dir/distill_checkpoint.pt`` every
    ``checkpoint_every`` steps, after the last step and on Ctrl-C, each write atomic (a temporary file
    renamed). ``resume=True`` loads that file into ``student`` (a fresh copy of the model the run started
    from, e.g. the same conversion again) and continues with the next step, giving the weights an
    uninterrupted run gives; it starts from step 0 when the directory holds no checkpoint, so one command
    serves both. A checkpoint of another run (other tokens, trained parameters or settings) is refused.
    ``steps`` (or ``token_budget``) may grow between runs under ``lr_schedule="constant"``.

    Args:
        student: the model to train (e.g. from :func:`convert_gqa_to_mla`).
        teacher: the reference model (e.g. the conversion's source); shares no parameters with ``student``
            and has the same ``vocab_size``.
        tokens: token ids ``[sequences, tokens]`` (or a list of equal-length 1-D tensors) in the vocabulary.
        steps: AdamW steps, an int >= 1; ``None``: from ``token_budget``, or 50 without one.
        lr: peak AdamW learning rate, a finite float > 0.
        temperature: softmax temperature of both distributions, a finite float > 0.
        batch_size: rows of ``tokens`` per step, an int >= 1.
        progress: show a tqdm bar (step, loss, tokens seen).
        token_budget: train on this many tokens: ``steps = ceil(token_budget / (batch_size * seq_len))``;
            an int >= 1, or ``None``. Give ``steps`` or ``token_budget``, not both.
        kl_weight: weight of the logit KL term, a float >= 0.
        hidden_weight: weight of the per-layer hidden-state term, a float >= 0.
        attention_weight: weight of the per-layer attention-output term, a float >= 0 (needs
            ``model.layers[i].self_attn`` in both models, with the same number of layers).
        train: ``"attention"`` (default): the attention projections (``q_proj``/``q_a_proj``/``q_b_proj``,
            ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``); ``"attention+mlp"``: those and every MLP;
            ``"all"``: every parameter (embeddings, norms and head too).
        lr_schedule: ``"constant"`` or ``"cosine"`` (half cosine from ``lr`` to ``0.1 * lr``), both after
            the warm-up.
        warmup_steps: linear warm-up steps from ``lr / warmup_steps`` to ``lr``, an int >= 0.
        max_grad_norm: clip the gradients' global norm to this (a finite float > 0), or ``None``.
        shuffle: visit the rows in a new random order each pass (drawn from ``seed``).
        seed: seed of the row order, an int.
        checkpoint_dir: directory for the checkpoint (created if missing), or ``None``.
        checkpoint_every: steps between checkpoints, an int >= 1; ``None``: only after the last step and on
            Ctrl-C. Needs ``checkpoint_dir``.
        resume: continue from the checkpoint in ``checkpoint_dir`` (needs it).

    Returns:
        The loss of every step done, including those of a resumed checkpoint.

    Raises:
        TypeError: ``student``/``teacher`` not modules, ``tokens`` not a tensor or list of tensors.
        ValueError: any other argument out of range, all loss weights 0, a checkpoint of another run
            (arguments are checked before any work).
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name} must be a causal LM (torch.nn.Module), got {type(model).__name__}")
    if student is teacher:
        raise ValueError("student and teacher must be two different models (the teacher is not trained)")
    if steps is not None:
        steps = check_int("steps", steps, 1)
    if token_budget is not None:
        token_budget = check_int("token_budget", token_budget, 1)
        if steps is not None:
            raise ValueError(f"give steps or token_budget, not both (got steps={steps}, token_budget={token_budget})")
    lr = check_positive_float("lr", lr)
    temperature = check_positive_float("temperature", temperature)
    batch_size = check_int("batch_size", batch_size, 1)
    progress = check_bool("progress", progress)
    weights = {n: _check_weight(n, v) for n, v in
               (("kl_weight", kl_weight), ("hidden_weight", hidden_weight), ("attention_weight", attention_weight))}
    if not any(weights.values()):
        raise ValueError("kl_weight, hidden_weight and attention_weight are all 0: nothing to train on")
    train = _choice("train", train, TRAIN_CHOICES)
    lr_schedule = _choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if max_grad_norm is not None:
        max_grad_norm = check_positive_float("max_grad_norm", max_grad_norm)
    shuffle = check_bool("shuffle", shuffle)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be None or a path (str or os.PathLike), got {type(checkpoint_dir).__name__}")
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (where to write the checkpoints)")
    resume = check_bool("resume", resume)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the checkpoint is)")
    vocab = [getattr(text_config(model), "vocab_size", None) for model in (student, teacher)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise ValueError(f"student and teacher must share a vocabulary: vocab_size {vocab[0]} and {vocab[1]}")
    tokens = _as_token_batch(tokens, "tokens", vocab[0] if vocab[0] is not None else vocab[1])
    if steps is None:
        steps = math.ceil(token_budget / (batch_size * tokens.shape[1])) if token_budget is not None else 50
    trained = {name: p for name, p in student.named_parameters() if _trained(name, train)}
    if not trained:
        raise ValueError(f"student ({type(student).__name__}) has no parameters to train under train={train!r} "
                         f"(attention projections are found by '.self_attn.' in their names)")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(f"student and teacher must share no parameters (the teacher is not trained); {len(shared)} shared")
    layer_pairs = list(zip(_decoder_layers(student), _decoder_layers(teacher)))
    if weights["attention_weight"] > 0:
        counts = (len(_decoder_layers(student)), len(_decoder_layers(teacher)))
        if not counts[0] or counts[0] != counts[1] or not all(
                hasattr(s, "self_attn") and hasattr(t, "self_attn") for s, t in layer_pairs):
            raise ValueError(f"attention_weight > 0 needs model.layers[i].self_attn in student and teacher with "
                             f"equal layer counts; got {counts[0]} and {counts[1]} layers")

    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    settings = {"batch_size": batch_size, "lr": lr, "temperature": temperature, "train": train,
                "lr_schedule": lr_schedule, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
                "shuffle": shuffle, "seed": seed, **weights}
    if lr_schedule != "constant":  # the schedule depends on the total length; a constant lr does not
        settings["steps"] = steps
    fingerprint = _fingerprint(tokens, sorted(trained), settings)
    device = next(student.parameters()).device
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    losses: list[float] = []
    step = 0
    perms: dict[int, torch.Tensor] = {}
    captured: dict[str, list] = {"student": [], "teacher": []}
    handle = PatchHandle(student, "attention outputs recorded for distillation")

    def recorder(key):
        def wrapper(module, original, *args, **kwargs):
            out = original(*args, **kwargs)
            captured[key].append(out[0] if isinstance(out, tuple) else out)
            return out
        return wrapper

    with _eval_mode(teacher), handle:  # deterministic targets: no dropout in the teacher
        optimizer = None
        try:
            for name, p in student.named_parameters():
                p.requires_grad_(name in trained)
            optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=0.0)
            if resume and (directory / CHECKPOINT_FILE).exists():
                step, losses = _load_checkpoint(directory, trained, optimizer, fingerprint)
            if weights["attention_weight"] > 0:
                for s_layer, t_layer in layer_pairs:
                    wrap_forward(s_layer.self_attn, recorder("student"), handle)
                    wrap_forward(t_layer.self_attn, recorder("teacher"), handle)
            want_hidden = weights["hidden_weight"] > 0
            student.train()
            bar = tqdm(total=steps, initial=min(step, steps), desc="recovery distillation", disable=not progress,
                       unit="step")
            with bar:
                while step < steps:
                    rows = _batch_rows(step, batch_size, len(tokens), shuffle, seed, perms)
                    row = tokens[rows].to(device)
                    captured["student"].clear()
                    captured["teacher"].clear()
                    with torch.no_grad():
                        t_out = teacher(input_ids=row, use_cache=False, output_hidden_states=want_hidden)
                    s_out = student(input_ids=row, use_cache=False, output_hidden_states=want_hidden)
                    terms = {}
                    if weights["kl_weight"] > 0:
                        target = F.log_softmax(t_out.logits.float() / temperature, -1)
                        log_q = F.log_softmax(s_out.logits.float() / temperature, -1)
                        terms["kl"] = F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                               reduction="batchmean")
                    if want_hidden:
                        pairs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
                        terms["hidden"] = sum(_relative_mse(s, t) for s, t in pairs) / len(pairs)
                    if weights["attention_weight"] > 0:
                        pairs = list(zip(captured["student"], captured["teacher"]))
                        terms["attention"] = sum(_relative_mse(s, t) for s, t in pairs) / len(pairs)
                    loss = sum(weights[f"{k}_weight"] * v for k, v in terms.items())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    with _uninterrupted():  # the update and its bookkeeping happen together or not at all
                        if max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(list(trained.values()), max_grad_norm)
                        for group in optimizer.param_groups:
                            group["lr"] = _lr_at(step, lr, steps, lr_schedule, warmup_steps)
                        optimizer.step()
                        losses.append(float(loss.detach()))
                        step += 1
                        if directory is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                            _save_checkpoint(directory, trained, optimizer, step, losses, fingerprint)
                    bar.update(1)
                    bar.set_postfix({k: f"{float(v.detach()):.4f}" for k, v in terms.items()}
                                    | {"tokens": step * batch_size * tokens.shape[1]}, refresh=False)
        except KeyboardInterrupt:
            saved = ""
            if directory is not None and optimizer is not None and step > 0:
                _save_checkpoint(directory, trained, optimizer, step, losses, fingerprint)
                saved = f"; checkpoint of step {step} in {directory}"
            warnings.warn(f"recovery distillation interrupted after {step} of {steps} steps{saved}", stacklevel=2)
        finally:
            for name, p in student.named_parameters():
                p.requires_grad_(flags[name])
                p.grad = None
            student.eval()
    return losses
