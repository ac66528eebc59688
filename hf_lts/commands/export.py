"""``hf-lts export --format onnx``: a deployable ``model.onnx`` beside the packed export."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..card import add_deploy_section, hub_id
from ..export import ONNX_FILE
from ..export.onnx import export_onnx, require_onnx
from ..export.packed import save_export
from .common import load_model
from .errors import UsageError, one_line, user_errors


def export_command(argv: Sequence[str]) -> int:
    """``hf-lts export --format onnx MODEL_DIR``: write ``model.onnx`` (ONNX QDQ) beside the packed export.

    MODEL_DIR is an export folder, a local checkpoint folder or a Hub id. The file goes into ``--output``,
    by default MODEL_DIR itself when it is a local folder, else ``./<repo name>``; an output folder other
    than MODEL_DIR also receives the packed export, so that it can be pushed as it is.
    """
    parser = argparse.ArgumentParser(
        prog="hf-lts export", description="Export a trained LTS model to a deployable format."
    )
    parser.add_argument(
        "model", metavar="MODEL_DIR", help="an export folder, a checkpoint folder or a Hub id"
    )
    parser.add_argument("--format", required=True, choices=["onnx"], help="onnx: an ONNX QDQ model.onnx")
    parser.add_argument("--output", help="the folder to write to (default: MODEL_DIR, or ./<repo name>)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: 21; native 2-bit types: 25)")
    parser.add_argument(
        "--weight-type",
        choices=["int8", "native"],
        default="int8",
        help="int8: every bit width in int8/uint8, runs on ONNX Runtime's integer kernels (default); "
        "native: int2/int4 types, a smaller file on float kernels",
    )
    parser.add_argument(
        "--image-size",
        "--image_size",
        type=int,
        help="side of the example input (default: config.image_size); any size runs unless --fixed-size",
    )
    parser.add_argument(
        "--fixed-size", action="store_true", help="fix height and width to --image-size in the graph"
    )
    args = parser.parse_args(argv)
    local = Path(args.model).is_dir()
    output = Path(args.output or (args.model if local else Path(args.model).name))
    try:
        require_onnx()  # before loading the model
    except ImportError as e:
        raise UsageError(one_line(e)) from e
    with user_errors(f"cannot export {args.model}"):
        model = load_model(args.model)
        size = args.image_size or getattr(model.config, "image_size", None) or 224
        example = torch.zeros(2, getattr(model.config, "num_channels", 3), size, size)
        if not (local and output.resolve() == Path(args.model).resolve()):
            save_export(model, output)
        path = export_onnx(
            model,
            output / ONNX_FILE,
            example_inputs=example,
            opset=args.opset,
            weight_type=args.weight_type,
            dynamic_size=not args.fixed_size,
        )
        add_deploy_section(output, hub_id(None if local else args.model))
    print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0
