"""Export a pretrained backbone as a folder timm loads (``timm.create_model("local-dir:<folder>",
pretrained=True)``), and optionally push it to the Hugging Face Hub with a model card.

    ssl-bocb export runs/quickstart --out exported/resnet18
    ssl-bocb export runs/my_run --out exported/my_vit --push-to-hub me/my-vit    # needs a token (huggingface-cli login)
"""
import argparse

from ..errors import cli_main
from ..models.publish import export_timm, push_to_hub


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a finished pretraining run folder, or its backbone.safetensors")
    ap.add_argument("--out", required=True, help="the folder to write (new or empty)")
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hub repository")
    ap.add_argument("--public", action="store_true", help="create the Hub repository public (default: private)")
    args = ap.parse_args(argv)
    out = export_timm(args.source, args.out)
    print(f"wrote {out}: model.safetensors, config.json, README.md (timm.create_model('local-dir:{out}', "
          f"pretrained=True))")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=not args.public)}")
