#!/usr/bin/env python3
"""Generate an image through Easel's (or ComfyUI's) HTTP API with nothing but the standard library.

    python3 examples/txt2img.py "a lighthouse at dawn" --seed 7 --server http://127.0.0.1:8188

It loads workflows/sd15_txt2img.json, sets the prompt text and seed, posts it to /prompt, polls
/history/<prompt_id> until the prompt has finished, and saves every output image from /view into
the current directory. Pass --api-key when the server was started with one.
"""
import argparse
import json
import pathlib
import time
import urllib.parse
import urllib.request

WORKFLOW = pathlib.Path(__file__).resolve().parent.parent / "workflows" / "sd15_txt2img.json"


def request(server, path, api_key, body=None):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-KEY"] = api_key
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(server + path, data=data, headers=headers)) as response:
        return response.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text")
    parser.add_argument("--negative", default="blurry, low quality")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoint", help="ckpt_name to use instead of the workflow's")
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--api-key")
    args = parser.parse_args()

    prompt = json.loads(WORKFLOW.read_text())
    prompt["6"]["inputs"]["text"] = args.text
    prompt["7"]["inputs"]["text"] = args.negative
    prompt["3"]["inputs"]["seed"] = args.seed
    if args.checkpoint:
        prompt["4"]["inputs"]["ckpt_name"] = args.checkpoint
    queued = json.loads(request(args.server, "/prompt", args.api_key, {"prompt": prompt}))
    prompt_id = queued["prompt_id"]
    print(f"queued {prompt_id}")

    while True:
        history = json.loads(request(args.server, f"/history/{prompt_id}", args.api_key))
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            break
        time.sleep(0.5)
    if entry["status"]["status_str"] != "success":
        raise SystemExit(f"prompt failed: {json.dumps(entry['status']['messages'])}")
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            data = request(args.server, f"/view?{query}", args.api_key)
            pathlib.Path(image["filename"]).write_bytes(data)
            print(f"saved {image['filename']} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
