"""MI-Face on Fredrikson's faces (CCS 2015, sec. 5): which Process step keeps faces faces, and how
the black-box attack fares with exact and rounded confidences. Prints, for the softmax target on
``faces`` (seed 0, the bench's victims and judge), each Process candidate's judged measures beside
the no-model reference, then the black-box attack without and with rounding to 2 decimals.

Run: ``python -m benchmarks.perf.mi_face [--alpha N] [--dataset faces|faces64]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from attacks.ensemble import TrainingConfig
from attacks.inversion import ImageFilter, MIFace, MIFaceBlackBox
from attacks.targets import CallableTarget, OutputFormat, TorchTarget
from benchmarks import datasets, models
from benchmarks.perf.attacks import print_table
from benchmarks.scenarios import DEFENCES, Context, inversion_setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=int, default=1000, help="white-box iterations (black-box: alpha / 4)")
    parser.add_argument("--dataset", default="faces")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    data = datasets.load(arguments.dataset)
    split = datasets.split(data, seed=0)
    recipe = models.recipe(data.name, "softmax").sized(len(split.train))
    torch.manual_seed(0)
    model = models.train_recipe(recipe.build(data.n_features, data.n_classes), recipe,
                                data.X[split.train], data.y[split.train], seed=0)
    context = Context(data, split, "softmax", recipe.hidden, TrainingConfig(), DEFENCES["none"], 0, False, model,
                      lambda X: X, lambda X: X)
    setting = inversion_setting(context)
    labels, start = setting.classes, setting.aux_X.mean(axis=0)
    rows = []

    def record(attack_name: str, process_name: str, attack, target) -> None:
        began = time.perf_counter()
        result = attack.run(target, data.n_features, labels=labels[: len(labels) if attack.name == "mi-face" else 10])
        judged = setting.measures(result.artefacts["reconstructions"], result.artefacts["labels"])
        rows.append({"attack": attack_name, "process": process_name,
                     **{m: f"{judged[m]:.3f} (ref {judged['reference_' + m]:.3f})"
                        for m in ("lineup_accuracy", "identification_accuracy", "ssim", "mse")},
                     "iterations": f"{result.metrics['iterations']:.0f}", "final cost": f"{result.metrics['cost']:.3f}",
                     "queries": result.queries, "s": f"{time.perf_counter() - began:.0f}"})

    processes = {"clip only": None, "denoise 0.5 + sharpen 0.5": ImageFilter(data.image_shape),
                 "denoise 0.5": ImageFilter(data.image_shape, 0.5, 0.0),
                 "denoise 0.3 + sharpen 0.3": ImageFilter(data.image_shape, 0.3, 0.3)}
    for name, process in processes.items():
        record("white-box", name, MIFace(alpha=arguments.alpha, process=process, start=start),
               TorchTarget(model, data.n_classes))
    for rounding in (None, 2):
        answer = (lambda X: models.predict_proba(model, X)) if rounding is None else (
            lambda X: models.predict_proba(model, X).round(rounding))
        attack = MIFaceBlackBox(alpha=arguments.alpha // 4, beta=30, start=start, image_shape=data.image_shape,
                                coarse=4, output=OutputFormat(rounding=rounding))
        record(f"black-box, rounding {rounding}", "clip only", attack, CallableTarget(answer, data.n_classes))
    print_table(f"MI-Face on {data.name}, softmax target, seed 0 (ref: the no-model reference)", rows)


if __name__ == "__main__":
    main()
