"""``hf-lts push``: upload an LTS export folder, with its model card, to the Hub."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..hub import HubUploadError, push_export
from .errors import one_line, user_errors


def push_command(argv: Sequence[str]) -> int:
    """``hf-lts push --repo-id ID PATH``: upload an LTS export folder, with its model card, to the Hub.

    The token comes from ``HF_TOKEN`` or ``hf auth login``, never from the command line (shell history).
    """
    parser = argparse.ArgumentParser(
        prog="hf-lts push", description="Upload an LTS export to the Hugging Face Hub."
    )
    parser.add_argument("path", help="the export folder (model.save_pretrained / trainer.save_model output)")
    parser.add_argument(
        "--repo-id", "--repo_id", required=True, help="the Hub model repo, e.g. me/resnet18-w2a2"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="the branch to commit to (default: main)")
    parser.add_argument("--commit-message", "--commit_message", help="the commit message")
    args = parser.parse_args(argv)
    try:
        with user_errors():
            commit = push_export(
                args.path,
                args.repo_id,
                private=args.private or None,
                revision=args.revision,
                commit_message=args.commit_message,
            )
    except HubUploadError as e:
        print(f"hf-lts push: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(
        f"Uploaded {args.path} to {commit.repo_url}\nLoad it with: import hf_lts; "
        f"AutoModelForImageClassification.from_pretrained({commit.repo_url.repo_id!r})"
    )
    return 0
