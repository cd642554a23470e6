"""Can the answers be trusted: "not a digit" on non-digits, acceptance and accuracy on digits
from MNIST and from outside it, calibration, per-digit errors. Part of `make bench`
(benchmarks/run.py calls measure), or alone, in about a minute:

    python -m benchmarks.trust --data-dir ../shared/mnist [--checkpoint artifacts/mnist_cnn.pt]
                               [--before OTHER_CHECKPOINT | --train-before]

--train-before first trains "before" (BEFORE_CHECKPOINT, a few minutes): `make train`'s recipe
without what training does for trust (outlier exposure, generated digits), so the per-digit
table shows what they changed; `make bench` does this.

Also the everyday shifts (benchmarks/shifted.py: MNIST-C and captures on --per-shift MNIST test
digits, accepted and correct per shift, MNIST-C's mean error).

writes benchmarks/TRUST.md, trust.json and reliability.png. Non-digits and real-world digits
come from training/synthetic.py's "eval" split (never trained on, never chosen by); the
thresholds of every score are chosen on the checkpoint's held-out validation digits, as
training does; MNIST test digits are only measured.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from serving.handler.artifact import ARTIFACTS_DIR, CHECKPOINT_NAME, TRUST_SCORES, Trust, artifact_path, softmax
from benchmarks.host import cpu_name
from benchmarks.fashion import FashionMissing, fashion_logits, measure_fashion
from benchmarks.fashion import markdown_lines as fashion_markdown
from benchmarks.shifted import PER_SHIFT, served_shifts, shift_table
from benchmarks.shifted import markdown_lines as shift_markdown
from benchmarks.thresholds import RuleSets, Scored, measure_rules, scored_shifts
from benchmarks.thresholds import markdown_lines as threshold_markdown
from export.artifacts import load_model
from training.data import DATA_DIR_ENV
from training.trust import ACCEPT_RATE, auroc

HERE = Path(__file__).resolve().parent
PER_CATEGORY = 300     # non-digits of each category (eval split)
PER_STYLE = 400        # real-world digits of each style (eval split: the held-out part)
VAL_PER_SHIFT = 300    # held-out training digits per shift (the shifts' validation split) the threshold rules see
AIM_REFUSED, AIM_ACCEPTED = 0.97, 0.99   # issue 26's targets
# "before": the default recipe with training's trust additions off (training/config.py).
BEFORE_FLAGS = ("--outlier-weight", "0", "--synthetic-digits", "0")
BEFORE_CHECKPOINT = artifact_path(CHECKPOINT_NAME, Path(ARTIFACTS_DIR) / "before")


def train_before(data_dir: str, out: str = BEFORE_CHECKPOINT) -> str:
    """Train the "before" model afresh (replacing any earlier one: it must be this code's)."""
    subprocess.run([sys.executable, "-m", "training", "--data-dir", data_dir, "--out", out, "--force",
                    *BEFORE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    return out


def saved_config(checkpoint: dict):
    """The checkpoint's TrainConfig (keys this code no longer knows left out)."""
    from training.config import TrainConfig
    return TrainConfig(**{key: value for key, value in checkpoint["train_config"].items()
                          if key in TrainConfig.__annotations__})


def held_out_count(checkpoint: dict) -> int:
    return saved_config(checkpoint).held_out_images


def recipe_summary(checkpoint: dict) -> dict:
    """What TRUST.md's header says of the model's training: each setting as the run used it (a
    setting left to the recipe's default is stored as None; here it is the value it stood for)."""
    config = saved_config(checkpoint)
    return {"epochs": config.epochs, "train_subset": config.train_subset,
            "outlier_weight": config.outlier_loss_weight, "outlier_images": config.outlier_pool_images,
            "synthetic_digits": config.synthetic_digit_count, "max_stroke_change": config.max_stroke_change,
            "shift_share": config.shift_share, "val_images": config.held_out_images, "select_by": config.select_by}


def model_outputs(model, checkpoint: dict, data_dir: str, sets: dict) -> dict:
    """(logits, labels) per set name for MNIST val/test and the generated sets, from a model
    load_model gave with its checkpoint."""
    from training.data import load_mnist
    from training.trust import model_logits

    train_images, train_labels = load_mnist(data_dir, train=True)
    test_images, test_labels = load_mnist(data_dir, train=False)
    held_out = held_out_count(checkpoint)
    labelled = {"val": (train_images[-held_out:], train_labels[-held_out:].numpy()),
                "mnist_test": (test_images, test_labels.numpy()),
                **{name: (made.images, made.labels) for name, made in sets.items()}}
    return {name: (model_logits(model, images), labels) for name, (images, labels) in labelled.items()}


def score_table(outputs: dict, sets: dict) -> dict:
    """Per score: threshold chosen on val (ACCEPT_RATE), MNIST test and real-world acceptance, refusal
    per non-digit category, AUROC non-digit vs MNIST test."""
    from training.trust import fit_trust

    val_logits, val_labels = outputs["val"]
    non_digit_logits = outputs["non_digits"][0]
    table = {}
    for score in TRUST_SCORES:
        trust = fit_trust(val_logits, val_labels, "val", score=score)
        table[score] = {
            "threshold": trust.threshold, "temperature": trust.temperature,
            "auroc": auroc(trust.scores(outputs["mnist_test"][0]), trust.scores(non_digit_logits)),
            **acceptance(trust, outputs, sets)}
    return table


def acceptance(trust: Trust, outputs: dict, sets: dict) -> dict:
    test_logits, _ = outputs["mnist_test"]
    non_digits = sets["non_digits"]
    refused = ~trust.is_digit(outputs["non_digits"][0])
    by_category = {}
    for category in dict.fromkeys(non_digits.categories):
        mask = non_digits.categories == category
        # Images preprocessing refused as blank are refused before the model (422 no_digit).
        blank = non_digits.blank.get(category, 0)
        by_category[category] = (int(refused[mask].sum()) + blank) / (int(mask.sum()) + blank)
    blank_all = sum(non_digits.blank.values())
    real_logits, real_labels = outputs["real_world"]
    real_accepted = trust.is_digit(real_logits)
    return {"mnist_test_accepted": float(trust.is_digit(test_logits).mean()),
            "non_digits_refused": (float(refused.sum()) + blank_all) / (len(refused) + blank_all),
            "refused_by_category": by_category,
            "real_world_accepted": float(real_accepted.mean()),
            "real_world_accuracy": float((real_logits.argmax(1) == real_labels).mean()),
            "real_world_accepted_and_correct": float((real_accepted & (real_logits.argmax(1) == real_labels)).mean())}


def calibration(outputs: dict, temperature: float) -> dict:
    from training.trust import expected_calibration_error

    return {name: {"ece_t1": expected_calibration_error(softmax(outputs[name][0]), outputs[name][1]),
                   f"ece_t{temperature:g}": expected_calibration_error(softmax(outputs[name][0] / temperature),
                                                                        outputs[name][1]),
                   "temperature": temperature}
            for name in ("val", "mnist_test", "real_world")}


def per_digit_errors(logits: np.ndarray, labels: np.ndarray, styles: np.ndarray) -> dict:
    wrong, digits = logits.argmax(1) != labels, range(logits.shape[1])
    table = {"all": [float(wrong[labels == digit].mean()) for digit in digits]}
    for style in dict.fromkeys(styles):
        table[str(style)] = [float(wrong[(labels == digit) & (styles == style)].mean()) for digit in digits]
    return table


def generated_sets(per_category: int, per_style: int) -> dict:
    from training.synthetic import non_digits, real_world_digits
    return {"non_digits": non_digits("eval", per_category), "real_world": real_world_digits("eval", per_style),
            "real_world_val": real_world_digits("train", per_style)}


def measure(data_dir: str, checkpoint: str = artifact_path(CHECKPOINT_NAME), before: str | None = None,
            per_category: int = PER_CATEGORY, per_style: int = PER_STYLE, per_shift: int = PER_SHIFT) -> dict:
    started = time.perf_counter()
    sets = generated_sets(per_category, per_style)
    model, saved = load_model(checkpoint)
    outputs = model_outputs(model, saved, data_dir, sets)
    trust = Trust.from_metadata(saved)
    results = {"checkpoint": checkpoint, "trust": trust.as_dict(), "train_config": recipe_summary(saved),
               "mnist_test_acc": float((outputs["mnist_test"][0].argmax(1) == outputs["mnist_test"][1]).mean()),
               "set_sizes": {name: len(made.images) for name, made in sets.items()},
               "blank": {name: made.blank for name, made in sets.items()},
               "served": acceptance(trust, outputs, sets),
               "scores": score_table(outputs, sets),
               "calibration": calibration(outputs, trust.temperature),
               "per_digit_errors": per_digit_errors(*outputs["real_world"], sets["real_world"].categories),
               "per_digit_errors_val": per_digit_errors(*outputs["real_world_val"],
                                                        sets["real_world_val"].categories)}
    results["reliability"] = reliability_bins(outputs, trust.temperature)
    eval_shifts = served_shifts(model, data_dir, per_shift, "eval")
    results["shifts"] = shift_table(model, trust, eval_shifts, per_shift, "eval")
    fashion = None
    try:
        fashion = fashion_logits(model)
        results["fashion"] = measure_fashion(trust, fashion, outputs["mnist_test"][0])
    except FashionMissing as error:
        results["fashion"] = {"missing": str(error)}
    results["thresholds"] = measure_rules(trust.temperature, RuleSets(
        val_clean=Scored(outputs["val"][0]),
        val_shifts=scored_shifts(served_shifts(model, data_dir, min(per_shift, VAL_PER_SHIFT), "val")),
        mnist_test=Scored(outputs["mnist_test"][0]), eval_shifts=scored_shifts(eval_shifts),
        non_digits=Scored(outputs["non_digits"][0], sum(sets["non_digits"].blank.values())),
        fashion=None if fashion is None else Scored(np.concatenate(list(fashion.logits.values())),
                                                    fashion.refused_before())))
    if before:
        before_outputs = model_outputs(*load_model(before), data_dir, sets)
        results["before"] = {"checkpoint": before,
                             "per_digit_errors": per_digit_errors(*before_outputs["real_world"],
                                                                  sets["real_world"].categories),
                             "per_digit_errors_val": per_digit_errors(*before_outputs["real_world_val"],
                                                                      sets["real_world_val"].categories),
                             "mnist_test_acc": float((before_outputs["mnist_test"][0].argmax(1)
                                                      == before_outputs["mnist_test"][1]).mean())}
    results["seconds"] = time.perf_counter() - started
    return results


def reliability_bins(outputs: dict, temperature: float, bins: int = 15) -> dict:
    """Per set and temperature: mean confidence, accuracy and count in each confidence bin."""
    from training.trust import confidence_bins
    return {f"{name} {label}": confidence_bins(softmax(outputs[name][0] / t), outputs[name][1], bins)
            for name in ("mnist_test", "real_world") for label, t in (("T=1", 1.0), (f"T={temperature:g}", temperature))}


def plot_reliability(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, name, title in zip(axes, ("mnist_test", "real_world"), ("MNIST test", "real-world digits (eval)")):
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        for label, points in results["reliability"].items():
            if label.startswith(name + " "):
                ece_key = "ece_t1" if label.endswith("T=1") else f"ece_t{results['calibration'][name]['temperature']:g}"
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                          label=f"{label.split(' ', 1)[1]} (ECE {results['calibration'][name][ece_key]:.3f})")
                for confidence, accuracy, count in points:   # a bin of 3 images says little: show it
                    axis.annotate(str(count), (confidence, accuracy), textcoords="offset points", xytext=(0, 6),
                                  ha="center", fontsize=7)
        axis.set(xlabel="confidence (numbers: images in the bin)", ylabel="accuracy", title=f"Reliability: {title}",
                 xlim=(0, 1), ylim=(0, 1.08))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict, command: str, cpu: str) -> str:
    served, trust = results["served"], results["trust"]
    lines = [f"# Trust: what the answers' is_digit and confidence are worth ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Reproduce: `{command}` on {cpu}. Model: `{results['checkpoint']}` (MNIST test accuracy "
             f"{results['mnist_test_acc']:.2%}; training: {json.dumps(results['train_config'])}).",
             f"Its trust record: `{json.dumps(trust)}`.", "",
             "Sets, all generated by `training/synthetic.py` (split eval, never trained on): "
             + ", ".join(f"{name} {size}" for name, size in results["set_sizes"].items())
             + " (real_world_val: split train, the validation part augmentations were chosen on). "
               "Images preprocessing refused as blank (answered 422 before the model) count as refused: "
             + json.dumps(results["blank"]["non_digits"]) + ".", "",
             "## The served model (its own trust record)", "",
             "| what | share |", "|---|---:|",
             f"| non-digits refused (aim >= {AIM_REFUSED:.0%}) | {served['non_digits_refused']:.2%} |",
             f"| MNIST test digits accepted (aim >= {AIM_ACCEPTED:.0%}) | {served['mnist_test_accepted']:.2%} |",
             f"| real-world digits accepted | {served['real_world_accepted']:.2%} |",
             f"| real-world digits correct (accepted or not) | {served['real_world_accuracy']:.2%} |",
             f"| real-world digits accepted and correct | {served['real_world_accepted_and_correct']:.2%} |", "",
             f"## Refusal per category, per score (threshold: {ACCEPT_RATE:.0%} of validation digits accepted)", ""]
    categories = list(served["refused_by_category"])
    lines += ["| score | AUROC | MNIST test accepted | real-world accepted | " + " | ".join(categories) + " | all |",
              "|---|---:|---:|---:|" + "---:|" * (len(categories) + 1)]
    for score, row in results["scores"].items():
        lines.append(f"| {score} | {row['auroc']:.4f} | {row['mnist_test_accepted']:.2%} | "
                     f"{row['real_world_accepted']:.2%} | "
                     + " | ".join(f"{row['refused_by_category'][c]:.1%}" for c in categories)
                     + f" | {row['non_digits_refused']:.2%} |")
    lines += ["", "Symbols and doodles are categories outlier exposure never trains on (training/synthetic.py).", ""]
    lines += shift_markdown(results["shifts"]) if "shifts" in results else []
    lines += fashion_markdown(results["fashion"]) if "fashion" in results else []
    lines += threshold_markdown(results["thresholds"]) if "thresholds" in results else []
    lines += ["## Calibration (ECE, 15 bins)", "",
              "| set | T = 1 | fitted T | ECE at fitted T |", "|---|---:|---:|---:|"]
    for name, row in results["calibration"].items():
        t = row["temperature"]
        lines.append(f"| {name} | {row['ece_t1']:.4f} | {t:g} | {row[f'ece_t{t:g}']:.4f} |")
    digits = range(len(results["per_digit_errors"]["all"]))
    lines += ["", "![reliability diagram](reliability.png)", "", "## Real-world digits: error per digit", "",
              "| model | set | " + " | ".join(str(d) for d in digits) + " |", "|---|---|" + "---:|" * len(digits)]
    models = [("before", results["before"])] if "before" in results else []
    models.append(("this model", results))
    for model_name, entry in models:
        for set_name, key in (("val (chose)", "per_digit_errors_val"), ("eval (held out)", "per_digit_errors")):
            for style, errors in entry[key].items():
                lines.append(f"| {model_name} | {set_name}, {style} | " + " | ".join(f"{e:.1%}" for e in errors) + " |")
    if "before" in results:
        before = results["before"]
        lines += ["", f"before: `{before['checkpoint']}`, the same recipe trained with `{' '.join(BEFORE_FLAGS)}` "
                      f"(MNIST test {before['mnist_test_acc']:.2%})."]
    return "\n".join(lines) + "\n"


def readme_lines(results: dict) -> list[str]:
    """Headline rows for the README's bench block (benchmarks/run.py)."""
    served, calibration = results["served"], results["calibration"]
    t = results["trust"]["temperature"]
    return [f"| not a digit: non-digits refused / MNIST test digits accepted ({results['trust']['score']}) | "
            f"{served['non_digits_refused']:.1%} / {served['mnist_test_accepted']:.1%} |",
            f"| real-world digits (typed, drawn, photographed): accepted / correct | "
            f"{served['real_world_accepted']:.1%} / {served['real_world_accuracy']:.1%} |",
            f"| ECE (15 bins) MNIST test / real-world, T=1 -> T={t:g} | "
            f"{calibration['mnist_test']['ece_t1']:.4f} / {calibration['real_world']['ece_t1']:.4f} -> "
            f"{calibration['mnist_test'][f'ece_t{t:g}']:.4f} / {calibration['real_world'][f'ece_t{t:g}']:.4f} |"]


def write(results: dict, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trust.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_reliability(results, out_dir / "reliability.png")
    (out_dir / "TRUST.md").write_text(markdown(results, command, cpu_name()))


@click.command()
@click.option("--data-dir", envvar=DATA_DIR_ENV, required=True, help=f"MNIST copy (env {DATA_DIR_ENV}).")
@click.option("--checkpoint", default=artifact_path(CHECKPOINT_NAME, ARTIFACTS_DIR), show_default=True)
@click.option("--before", default=None, help="Another checkpoint whose per-digit errors to show beside.")
@click.option("--train-before", "train_before_flag", is_flag=True, help=f"Train the before model first ({' '.join(BEFORE_FLAGS)}).")
@click.option("--per-category", type=click.IntRange(min=10), default=PER_CATEGORY, show_default=True)
@click.option("--per-style", type=click.IntRange(min=10), default=PER_STYLE, show_default=True)
@click.option("--per-shift", type=click.IntRange(min=10), default=PER_SHIFT, show_default=True)
@click.option("--out-dir", default=str(HERE), show_default=True)
def main(data_dir, checkpoint, before, train_before_flag, per_category, per_style, per_shift, out_dir) -> None:
    """Measure refusal, acceptance, calibration and per-digit errors of a checkpoint."""
    from training.checkpoint import CheckpointError
    if before and train_before_flag:
        raise click.UsageError("--before and --train-before: give one")
    try:
        if train_before_flag:
            before = train_before(data_dir)
        results = measure(data_dir, checkpoint, before, per_category, per_style, per_shift)
    except subprocess.CalledProcessError as error:
        raise click.ClickException(f"training the before model failed (exit {error.returncode})") from None
    except (CheckpointError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    command = "python -m benchmarks.trust --data-dir DATA" + (f" --checkpoint {checkpoint}" if checkpoint !=
                                                              artifact_path(CHECKPOINT_NAME) else "") \
        + (" --train-before" if train_before_flag else f" --before {before}" if before else "") \
        + (f" --per-shift {per_shift}" if per_shift != PER_SHIFT else "")
    write(results, Path(out_dir), command)
    click.echo((Path(out_dir) / "TRUST.md").read_text())


if __name__ == "__main__":
    main()
