"""Key smoothing variants on the synthetic world with the shipped tiny CLIP (measurement for issue 11 item 7)."""
import sys, time
import numpy as np, torch
from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.datasets import get_dataset
from denseclip.evaluation import Evaluation, iter_ground_truth, score_labeler
from denseclip.metrics import summarize
from denseclip.models import load_clip
from denseclip.predictor import DenseCLIP

torch.set_num_threads(2)
gt_url = sys.argv[1]
info = get_dataset("synthetic")
clip = load_clip()
settings = [
    ("none", {}),
    ("pd 0.5", {"prompt_denoising": 0.5}),
    ("ks 1.0 (official)", {"key_smoothing": 1.0}),
    ("ks 0.9", {"key_smoothing": 0.9}),
    ("ks 0.5", {"key_smoothing": 0.5}),
    ("ks 1.0 + pd 0.5", {"key_smoothing": 1.0, "prompt_denoising": 0.5}),
] + [(f"affinity {t}", {"key_affinity_smoothing": t}) for t in (0.0, 0.3, 0.5, 0.7, 0.9)] + [
    ("affinity 0.5 + pd 0.5", {"key_affinity_smoothing": 0.5, "prompt_denoising": 0.5}),
]
for name, options in settings:
    t = time.time()
    labeler = DenseCLIP(clip, info.classes, "synthetic", **options)
    ev = Evaluation(info.num_classes, 255, 0)
    score_labeler(iter_ground_truth(gt_url), labeler, ev)
    s = summarize(ev.matrix(), info.class_names, unseen=info.unseen)
    print(f"| {name} | {s['miou']:.2f} | {s['miou_seen']:.2f} | {s['miou_unseen']:.2f} | {s['pixel_accuracy']:.2f} | {time.time()-t:.1f} s |", flush=True)
