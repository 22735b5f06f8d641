"""TransMLA recovery training (``distill_from_teacher``): the loss terms against their formulas, the token
budget, which parameters train, and checkpoints: an interrupted and resumed run gives exactly the weights
of an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from test_transmla import sharp_model, tokens
from kvcompress.transmla import CHECKPOINT_FILE, convert_gqa_to_mla, distill_from_teacher


@pytest.fixture(scope="module")
def calibration():
    return tokens(batch=4, length=32, seed=5)


@pytest.fixture(scope="module")
def source():
    return sharp_model("llama")


def student_of(source, calibration, **settings):
    settings = {"kv_lora_rank": 9, "rope_dim": 8} | settings
    return convert_gqa_to_mla(source, calibration=calibration, progress=False, **settings)


def trained_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


class Stop(Exception):
    """A crash (not Ctrl-C) in the middle of training."""


def interrupt_at(model, forward_index, error):
    """Make ``model``'s ``forward_index``-th forward (0-based) raise ``error``."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == forward_index + 1:
            raise error

    return model.register_forward_pre_hook(hook)


RUN = dict(steps=6, lr=3e-3, batch_size=2, progress=False)


@pytest.mark.parametrize(
    "options",
    [{}, {"shuffle": True, "seed": 3, "hidden_weight": 0.5, "attention_weight": 0.5, "lr_schedule": "cosine",
          "warmup_steps": 2, "max_grad_norm": 1.0, "train": "attention+mlp"}],
    ids=["plain", "every-option"],
)
def test_ctrl_c_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, source, calibration, options):
    reference = student_of(source, calibration)
    expected_losses = distill_from_teacher(reference, source, calibration, **RUN, **options)
    expected = trained_state(reference)

    first = student_of(source, calibration)
    handle = interrupt_at(source, 3, KeyboardInterrupt)  # the teacher's 4th forward: steps 0-2 are done
    with pytest.warns(UserWarning, match=r"interrupted after 3 of 6 steps; checkpoint of step 3 in"):
        losses = distill_from_teacher(first, source, calibration, **RUN, **options, checkpoint_dir=tmp_path)
    handle.remove()
    assert losses == expected_losses[:3]
    assert (tmp_path / CHECKPOINT_FILE).exists() and not list(tmp_path.glob("*.partial"))
    assert not first.training and all(p.requires_grad for p in first.parameters())

    resumed = student_of(source, calibration)  # a fresh process: the same conversion again
    losses = distill_from_teacher(resumed, source, calibration, **RUN, **options, checkpoint_dir=tmp_path,
                                  resume=True)
    assert losses == expected_losses
    assert_same_weights(trained_state(resumed), expected)
    assert not torch.equal(expected["model.layers.0.self_attn.kv_b_proj.weight"],
                           student_of(source, calibration).state_dict()["model.layers.0.self_attn.kv_b_proj.weight"])


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, source, calibration):
    reference = student_of(source, calibration)
    expected_losses = distill_from_teacher(reference, source, calibration, **RUN)

    first = student_of(source, calibration)
    handle = interrupt_at(source, 5, Stop())  # a crash in step 5: the checkpoint of step 4 is the last
    with pytest.raises(Stop):
        distill_from_teacher(first, source, calibration, **RUN, checkpoint_dir=tmp_path, checkpoint_every=2)
    handle.remove()
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 4 and saved["losses"] == expected_losses[:4]

    resumed = student_of(source, calibration)
    losses = distill_from_teacher(resumed, source, calibration, **RUN, checkpoint_dir=tmp_path,
                                  checkpoint_every=2, resume=True)
    assert losses == expected_losses
    assert_same_weights(trained_state(resumed), trained_state(reference))


def test_a_finished_run_can_be_extended_under_a_constant_lr(tmp_path, source, calibration):
    reference = student_of(source, calibration)
    distill_from_teacher(reference, source, calibration, **RUN)
    short = student_of(source, calibration)
    distill_from_teacher(short, source, calibration, **(RUN | {"steps": 2}), checkpoint_dir=tmp_path)
    longer = student_of(source, calibration)
    losses = distill_from_teacher(longer, source, calibration, **RUN, checkpoint_dir=tmp_path, resume=True)
    assert len(losses) == 6
    assert_same_weights(trained_state(longer), trained_state(reference))


def test_resume_without_a_checkpoint_starts_from_step_zero(tmp_path, source, calibration):
    reference = student_of(source, calibration)
    distill_from_teacher(reference, source, calibration, **RUN)
    fresh = student_of(source, calibration)
    distill_from_teacher(fresh, source, calibration, **RUN, checkpoint_dir=tmp_path / "new", resume=True)
    assert_same_weights(trained_state(fresh), trained_state(reference))
    assert (tmp_path / "new" / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("change,field", [({"lr": 1e-3}, "lr"), ({"batch_size": 1}, "batch_size"),
                                          ({"train": "all"}, "trained"), ({"hidden_weight": 1.0}, "hidden_weight")])
def test_resume_refuses_the_checkpoint_of_another_run(tmp_path, source, calibration, change, field):
    distill_from_teacher(student_of(source, calibration), source, calibration, **(RUN | {"steps": 1}),
                         checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"checkpoint in .* is of another run \(.*{field}.*differ"):
        distill_from_teacher(student_of(source, calibration), source, calibration, **(RUN | change),
                             checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"tokens_digest"):  # other data
        distill_from_teacher(student_of(source, calibration), source, calibration.flip(1), **RUN,
                             checkpoint_dir=tmp_path, resume=True)


def test_token_budget_sets_the_number_of_steps(source, calibration):
    # 2 rows of 32 tokens per step: 100 tokens need ceil(100 / 64) = 2 steps
    losses = distill_from_teacher(student_of(source, calibration), source, calibration, token_budget=100,
                                  batch_size=2, progress=False)
    assert len(losses) == 2
    losses = distill_from_teacher(student_of(source, calibration), source, calibration, token_budget=128,
                                  batch_size=2, progress=False)
    assert len(losses) == 2


def _attention_outputs(model, ids):
    outputs = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
               for layer in model.model.layers]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    return out, outputs


def _relative(a, b):
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


def test_the_first_loss_is_the_formula_of_the_module_docstring(source, calibration):
    student = student_of(source, calibration)
    ids = calibration[:2]
    t_out, t_attn = _attention_outputs(source, ids)
    s_out, s_attn = _attention_outputs(student, ids)
    kl = torch.nn.functional.kl_div(s_out.logits.log_softmax(-1).flatten(0, 1),
                                    t_out.logits.log_softmax(-1).flatten(0, 1), log_target=True,
                                    reduction="batchmean").item()
    layers = len(source.model.layers)
    hidden = sum(_relative(s, t) for s, t in zip(s_out.hidden_states[1:], t_out.hidden_states[1:])) / layers
    attention = sum(_relative(s, t) for s, t in zip(s_attn, t_attn)) / layers
    assert min(kl, hidden, attention) > 1e-4  # the lossy conversion differs in every term
    losses = distill_from_teacher(student, source, ids, steps=1, batch_size=2, progress=False,
                                  kl_weight=0.5, hidden_weight=2.0, attention_weight=3.0)
    assert losses[0] == pytest.approx(0.5 * kl + 2.0 * hidden + 3.0 * attention, rel=1e-5)


def test_per_layer_terms_are_zero_for_the_lossless_conversion_and_train_a_lossy_one(source, calibration):
    lossless = convert_gqa_to_mla(source, progress=False)
    losses = distill_from_teacher(lossless, source, calibration, steps=1, lr=1e-12, batch_size=2, progress=False,
                                  kl_weight=0.0, hidden_weight=1.0, attention_weight=1.0)
    assert losses[0] < 1e-9
    lossy = student_of(source, calibration)
    losses = distill_from_teacher(lossy, source, calibration, steps=12, lr=1e-3, batch_size=4, progress=False,
                                  kl_weight=0.0, hidden_weight=1.0, attention_weight=1.0)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("train,changes,frozen", [
    ("attention", ["self_attn.kv_b_proj"], ["mlp.up_proj", "embed_tokens", "input_layernorm", "kv_a_layernorm"]),
    ("attention+mlp", ["self_attn.kv_b_proj", "mlp.up_proj"], ["embed_tokens", "input_layernorm"]),
    ("all", ["self_attn.kv_b_proj", "mlp.up_proj", "embed_tokens", "input_layernorm"], []),
])
def test_train_chooses_the_parameters_that_change(source, calibration, train, changes, frozen):
    student = student_of(source, calibration)
    before = trained_state(student)
    distill_from_teacher(student, source, calibration, steps=2, lr=1e-2, batch_size=2, progress=False, train=train)
    after = trained_state(student)
    for part in changes:
        assert any(part in k and not torch.equal(before[k], after[k]) for k in before), part
    for part in frozen:
        assert all(torch.equal(before[k], after[k]) for k in before if part in k), part


def test_cosine_schedule_warms_up_and_ends_at_a_tenth():
    from kvcompress.transmla.distill import _lr_at

    lrs = [_lr_at(s, 1.0, 10, "cosine", 2) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert [_lr_at(s, 1.0, 10, "constant", 0) for s in range(3)] == [1.0, 1.0, 1.0]


def test_shuffled_passes_visit_every_row_once_per_pass():
    from kvcompress.transmla.distill import _batch_rows

    perms = {}
    seen = torch.cat([_batch_rows(s, 3, 6, True, 0, perms) for s in range(4)])  # two passes over 6 rows
    assert sorted(seen[:6].tolist()) == list(range(6)) and sorted(seen[6:].tolist()) == list(range(6))
    assert not torch.equal(seen[:6], seen[6:])
    assert torch.equal(_batch_rows(3, 3, 6, True, 0, {}), seen[9:])  # a function of the step alone


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"token_budget": 0}, ValueError, r"token_budget must be an int >= 1, got 0"),
        ({"token_budget": 64, "steps": 2}, ValueError, r"give steps or token_budget, not both"),
        ({"hidden_weight": -1.0}, ValueError, r"hidden_weight must be a finite float >= 0, got -1.0"),
        ({"attention_weight": math.nan}, ValueError, r"attention_weight must be a finite float >= 0, got nan"),
        ({"kl_weight": 0.0}, ValueError, r"kl_weight, hidden_weight and attention_weight are all 0"),
        ({"train": "mlp"}, ValueError, r"train must be one of \('attention', 'attention\+mlp', 'all'\), got 'mlp'"),
        ({"lr_schedule": "linear"}, ValueError, r"lr_schedule must be one of \('constant', 'cosine'\), got 'linear'"),
        ({"warmup_steps": -1}, ValueError, r"warmup_steps must be an int >= 0, got -1"),
        ({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm must be a finite float > 0, got 0.0"),
        ({"shuffle": 1}, ValueError, r"shuffle must be True or False, got 1"),
        ({"seed": 1.5}, ValueError, r"seed must be an int, got 1.5"),
        ({"checkpoint_every": 5}, ValueError, r"checkpoint_every needs checkpoint_dir"),
        ({"checkpoint_every": 0, "checkpoint_dir": "x"}, ValueError, r"checkpoint_every must be an int >= 1, got 0"),
        ({"resume": True}, ValueError, r"resume=True needs checkpoint_dir"),
        ({"resume": "yes", "checkpoint_dir": "x"}, ValueError, r"resume must be True or False, got 'yes'"),
        ({"checkpoint_dir": 3}, TypeError, r"checkpoint_dir must be None or a path .*, got int"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(tmp_path, source, calibration, kwargs, error, match):
    student = student_of(source, calibration)
    hook = student.register_forward_pre_hook(lambda *a: pytest.fail("work started"))
    before = trained_state(student)
    with pytest.raises(error, match=match):
        distill_from_teacher(student, source, calibration, progress=False, **kwargs)
    hook.remove()
    assert_same_weights(trained_state(student), before)
    assert not list(tmp_path.iterdir())
