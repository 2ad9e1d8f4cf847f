"""The names several layers share: the shipped models, the default model, dense heads, precisions, the resize and
normalisation choices. At the bottom of the package: it imports nothing (no torch), so a configuration is
validated, and a model named, without loading any model code."""

TINY_MODEL = "denseclip-tiny-shapes"
TINY_VIT_MODEL = "denseclip-tiny-shapes-vit"
DEFAULT_MODEL = "RN50"  # the paper's CLIP, with OpenAI's weights: the labeller when no model is named
TINY_COCO_STUFF_MODEL = "denseclip-tiny-cocostuff"  # the COCO-Stuff world's (denseclip.synthetic_coco_stuff)
# The shipped models, trained at one resolution: "auto" keeps images as they are.
TINY_MODELS = (TINY_MODEL, TINY_VIT_MODEL, TINY_COCO_STUFF_MODEL)
PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
# precision "auto": half precision on a GPU; bf16 on CPUs that compute in it natively, where it labelled RN50 images
# 1.79x as fast as fp32 and moved the tiny CLIP's synthetic mIoU by +0.01 points (README, "The model stage's speed");
# fp32 elsewhere (emulated bf16 is slower than fp32).
CUDA_PRECISION = "fp16"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic
# size_bucket "auto": on a GPU, whole images are padded to multiples of this many pixels so that photos of nearly
# the same size share a forward pass; a CPU labels an image as fast alone as in a batch, so it pads to the stride.
CUDA_SIZE_BUCKET = 128

MODES = ("whole", "slide")
# Dense heads (denseclip.dense): MaskCLIP/DenseCLIP's (the default, and the ResNet towers' only head), then the
# training-free ViT heads that followed it: SCLIP's, ClearCLIP's and NACLIP's.
HEADS = ("maskclip", "sclip", "clearclip", "naclip")
DEFAULT_HEAD = "maskclip"
# resize_to "auto": real CLIP models see images resized as the paper's VOC / COCO-Stuff protocol resizes them
# (keep ratio, fit (2048, 512): a 512-pixel short side for ordinary photos, not a 24-megapixel forward).
DEFAULT_RESIZE = (2048, 512)
RESIZE_AUTO, RESIZE_NATIVE = "auto", "native"
NO_PROTOCOL = "none"  # --protocol none: no preset, even where one is the default (evaluate.py --dataset)
# The mean/std images are normalised with: CLIP's own (what CLIP was trained with; the successors use it), or the
# ImageNet statistics MMSegmentation's configs hold, which the official DenseCLIP code feeds CLIP too.
NORMALISATIONS = ("clip", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
