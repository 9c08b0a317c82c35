"""Prompt editing, alternation and AND (ldmkit.prompt_schedule) against A1111's published schedules, and
generations against hand-built sampling that switches or combines conditionings itself."""

from __future__ import annotations

import pytest
import torch

from ldmkit import core
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.denoisers import CFGDenoiser, Conditioning
from ldmkit.model import StableDiffusion
from ldmkit.prompt_schedule import ScheduledConditioning, encode_scheduled, prompt_schedule, split_and, total_steps

pytestmark = pytest.mark.usefixtures("one_thread")

# A1111 modules/prompt_parser.py, get_learned_conditioning_prompt_schedules' doctests (steps = 10)
A1111_DOCSTRING = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_DOCSTRING)
def test_a1111_docstring_schedules(prompt, expected):
    assert [list(e) for e in prompt_schedule(prompt, 10)] == expected


def test_a1111_docstring_hires_schedules():
    # the same docstring, second part: a hires pass of 10 steps after 10 (g = ...([p], 10, 10)[0])
    assert prompt_schedule("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, 10) == [(3, "a  c"), (10, "a b c")]  # step numbers count on


def test_a1111_docstring_unhandled_example():
    # The docstring lists "a [{b|d{:.5] c" -> [[5, 'a  c'], [10, 'a {b|d{ c']] under "not handling this right
    # now": its grammar has no "|" outside an alternation, so A1111's code (lark 1.1.2, checked) returns the
    # prompt unchanged, as here.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_a1111_comment_example():
    # the comment at the top of A1111's prompt_parser.py, steps = 100
    p = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
         "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(p, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_when_rules_and_nesting():
    # a decimal point makes a fraction of the steps, none a step number; beyond the steps: never switches;
    # 0 or negative: switched from the start
    assert prompt_schedule("[a:b:2]", 4) == [(2, "a"), (4, "b")]
    assert prompt_schedule("[a:b:0.5]", 4) == [(2, "a"), (4, "b")]
    assert prompt_schedule("[a:b:1.5]", 4) == [(4, "a")]
    assert prompt_schedule("[a:b:9]", 4) == [(4, "a")]
    assert prompt_schedule("[a:b:0]", 4) == [(4, "b")]
    assert prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]
    assert prompt_schedule("a (b [c:d:2]:1.2) e", 4) == [(2, "a (b c:1.2) e"), (4, "a (b d:1.2) e")]
    assert prompt_schedule("[a|b] | c", 3) == [(3, "[a|b] | c")]  # a bare "|": A1111 reads no syntax at all
    assert prompt_schedule("a cat BREAK [dog:wolf:1] \\[x:y:1\\]", 2) == [
        (1, "a cat BREAK dog \\[x:y:1\\]"), (2, "a cat BREAK wolf \\[x:y:1\\]")]


def test_and_split_and_weights():
    assert split_and("a cat AND a dog :0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a (cat:1.2) AND dog:-1 AND ANDROID") == [("a (cat:1.2)", 1.0), (" dog", -1.0),
                                                               (" ANDROID", 1.0)]
    assert split_and("plain") == [("plain", 1.0)]


def test_second_order_samplers_schedule_over_every_model_call():
    assert total_steps(10, "heun") == 20 and total_steps(10, "dpmpp_sde") == 20
    assert total_steps(10, "euler") == 10 and total_steps(10, "dpmpp_2m") == 10


def test_each_distinct_text_encoded_once_and_plain_prompts_untouched():
    calls = []

    def encode(pos, neg):
        calls.append((list(pos), list(neg)))
        return (Conditioning(torch.arange(len(pos), dtype=torch.float32).reshape(-1, 1, 1)),
                Conditioning(-torch.arange(len(neg), dtype=torch.float32).reshape(-1, 1, 1)))

    cond, uncond = encode_scheduled(encode, ["x (y:1.3) BREAK z", "plain"], ["bad", "bad"], 4, "euler")
    assert calls == [(["x (y:1.3) BREAK z", "plain"], ["bad", "bad"])]
    assert type(cond) is Conditioning and type(uncond) is Conditioning
    calls.clear()
    cond, uncond = encode_scheduled(encode, ["[a|b] AND[a|b]:2", "[a:c:2]"], ["[n:m:1]", "n"], 4, "euler")
    assert calls == [(["a", "b", "c"], ["n", "m", "m"])]  # negatives padded to the same length by a repeat
    assert isinstance(cond, ScheduledConditioning)
    info = cond.prompts
    assert info.cond[0] == ((1.0, ((1, 0), (2, 1), (3, 0), (4, 1))), (2.0, ((1, 0), (2, 1), (3, 0), (4, 1))))
    assert info.cond[1] == ((1.0, ((2, 0), (4, 2))),)
    assert info.uncond == (((1, 0), (4, 1)), ((4, 0),))
    calls.clear()  # LoRA tags anywhere in the first prompt reach the first text (the one they are read from)
    encode_scheduled(encode, ["a cat AND a dog <lora:x:0.5>"], [""], 4, "euler")
    assert calls[0][0] == ["a cat <lora:x:0.5>", " a dog <lora:x:0.5>"]


# ---------------------------------------------------------------- generations

W, H = 16, 16


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def _encode(model, prompt, negative="blurry"):
    c, u = core.encode_prompt(model, [prompt], [negative])
    return c, u


def _generate(model, params):
    job = core.prepare(model, params)
    return job, core.sample(model, job.plan, job.cond, job.uncond, job.noise), core.make_denoiser(model, job.plan)


def _step_by_step(job, den, conds, scale):
    """The plan's sampler run one step at a time, step i guided by ``conds[i] = (cond, uncond)``."""
    x = job.noise * job.plan.spec.start_scale(job.plan.sigmas[0])
    with torch.inference_mode():
        for i, (c, u) in enumerate(conds):
            x = job.plan.fn(CFGDenoiser(den, c, u, scale), x, job.plan.sigmas[i:i + 2])
    return x


def test_prompt_editing_switches_conditioning_at_the_step(model):
    params = P.GenerationParams("a [red:blue:0.5] apple", negative_prompt="blurry", steps=4, cfg_scale=5.0,
                                sampler="Euler", seed=3, width=W, height=H)
    job, got, den = _generate(model, params)
    red, u = _encode(model, "a red apple")
    blue, _ = _encode(model, "a blue apple")
    # A1111: [red:blue:0.5] of 4 steps is [(2, red), (4, blue)]; call k reads the first entry with k <= end:
    # red for calls 0, 1, 2, blue for call 3
    assert torch.equal(got, _step_by_step(job, den, [(red, u)] * 3 + [(blue, u)], 5.0))
    only_red = core.sample(model, job.plan, Conditioning(red), Conditioning(u), job.noise)
    assert not torch.allclose(got, only_red)  # the switch changed the result


def test_alternation_and_negative_schedule(model):
    params = P.GenerationParams("a [cat|dog]", negative_prompt="[ugly::1]", steps=3, cfg_scale=4.0,
                                sampler="Euler", seed=5, width=W, height=H)
    job, got, den = _generate(model, params)
    (cat, ugly), (dog, empty) = _encode(model, "a cat", "ugly"), _encode(model, "a dog", "")
    # [(1, cat), (2, dog), (3, cat)] and [(1, ugly), (3, "")]: calls 0 and 1 read cat/ugly, call 2 dog/""
    assert torch.equal(got, _step_by_step(job, den, [(cat, ugly), (cat, ugly), (dog, empty)], 4.0))


def test_and_with_weights_is_the_composable_combination(model):
    params = P.GenerationParams("a cat AND a dog :0.5", negative_prompt="blurry", steps=2, cfg_scale=6.0,
                                sampler="Euler", seed=7, width=W, height=H)
    job, got, den = _generate(model, params)
    c1, u = _encode(model, "a cat")
    c2, _ = _encode(model, " a dog")

    def composed(x, sigma):  # uncond + sum_i w_i * (cond_i - uncond) * cfg_scale, each on its own call
        d_u, d_1, d_2 = (den(x, sigma, context=c) for c in (u, c1, c2))
        return d_u + (1.0 * (d_1 - d_u) + 0.5 * (d_2 - d_u)) * 6.0

    x = job.noise * job.plan.spec.start_scale(job.plan.sigmas[0])
    with torch.inference_mode():
        want = job.plan.fn(composed, x, job.plan.sigmas)
    # separate network calls vs one batched call differ by float32 rounding (~3e-7 relative), times cfg_scale
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


def test_plain_prompt_is_the_ordinary_conditioning(model):
    params = P.GenerationParams("a (red:1.2) apple BREAK sky", negative_prompt="blurry", steps=2, seed=1,
                                width=W, height=H)
    job = core.prepare(model, params)
    c, u = _encode(model, params.prompt)
    assert type(job.cond) is Conditioning and torch.equal(job.cond.context, c) and torch.equal(job.uncond.context, u)


def test_infotext_keeps_the_prompt_as_written(model):
    params = P.GenerationParams("a [red:blue:0.5] apple AND sky:0.3", steps=2, sampler="Euler a", seed=2,
                                width=W, height=H)
    img = P.txt2img(model, params)[0]
    assert img.info["parameters"].startswith("a [red:blue:0.5] apple AND sky:0.3\n")


def test_batch_of_an_inpainting_model_equals_single_images():
    # AND + alternation on a 9-channel model with a second-order sampler: the mask/masked-image channels follow
    # every AND part, and each image of a batch is what it would be alone
    torch.manual_seed(1)
    inp = StableDiffusion(TINY.replace(unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "in_channels": 9}))).eval()
    params = P.GenerationParams("a [cat|dog] AND sky:0.5", negative_prompt="[x:y:2]", steps=3, seed=4, width=W,
                                height=H, batch_size=2, sampler="Heun")
    both = P.txt2img_latents(inp, params)[1]
    for i in range(2):
        one = P.txt2img_latents(inp, params.replace(batch_size=1, seed=4 + i))[1]
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-3, rtol=1e-4)  # batched vs not: float32 rounding


def test_hires_second_pass_schedules_after_the_first(model, monkeypatch):
    from ldmkit.hires import HiresParams, txt2img_hires

    seen = []
    real = core.sample

    def spy(model_, plan, cond, uncond, noise, **kw):
        seen.append(cond)
        return real(model_, plan, cond, uncond, noise, **kw)

    monkeypatch.setattr(core, "sample", spy)
    params = P.GenerationParams("a [red:blue:0.5] apple", steps=4, sampler="Euler", seed=4, width=W, height=H)
    txt2img_hires(model, params, HiresParams(scale=1.5, upscaler="Nearest", steps=3, denoise=0.6))
    first, second = seen
    assert first.prompts.cond[0] == ((1.0, ((2, 0), (4, 1))),)  # red, blue
    # the hires pass comes after the switch at 0.5: blue throughout (A1111's hires_steps schedule)
    blue, _ = _encode(model, "a blue apple", "")
    assert type(second) is Conditioning and torch.equal(second.context, blue)


def test_a_single_changed_text_is_encoded(model):
    # "[red:blue:0]" is blue from the start: one text, but not the prompt as written
    job = core.prepare(model, P.GenerationParams("a [red:blue:0] apple", steps=2, width=W, height=H))
    assert torch.equal(job.cond.context, _encode(model, "a blue apple", "")[0])


def test_sdxl_prompt_editing_carries_pooled_and_ids():
    from ldmkit import sdxl
    from ldmkit.config import TINY_SDXL

    torch.manual_seed(2)
    xl = sdxl.StableDiffusionXL(TINY_SDXL).eval()
    xl.compute_dtype = None
    params = P.GenerationParams("a [red:blue:1] apple", negative_prompt="blurry", steps=3, cfg_scale=5.0,
                                sampler="Euler", seed=1, width=W, height=H)
    job, got, den = _generate(xl, params)
    red, u = sdxl.encode_conditioning(xl, ["a red apple"], ["blurry"], params)
    blue, _ = sdxl.encode_conditioning(xl, ["a blue apple"], ["blurry"], params)
    # [(1, red), (3, blue)]: calls 0 and 1 red, call 2 blue; each with its own pooled vector
    assert torch.equal(got, _step_by_step(job, den, [(red, u), (red, u), (blue, u)], 5.0))
