#!/usr/bin/env python3
"""Easel's REST API (`/v1`) from Python, with `requests` only.

    pip install requests
    python3 examples/rest_client.py --server http://127.0.0.1:8188 [--api-key KEY]

Runs each answer style of POST /v1/generate on the tiny test models (`easel testmodels
easel-data/models` writes them): the finished task as JSON, async + polling, image bytes by
Accept, a server-sent-event stream, and a multipart img2img upload; then lists and deletes the
tasks. Every image is saved into the current directory.
"""
import argparse
import base64
import json
import time

import requests

TINY = {"family": "sd15", "model": "easel_tiny_sd1.safetensors", "width": 64, "height": 64, "steps": 4}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    session = requests.Session()
    if args.api_key:
        session.headers["X-API-KEY"] = args.api_key
    url = args.server.rstrip("/")

    def check(response):
        if response.status_code >= 400:
            error = response.json()["error"]
            raise SystemExit(f"{response.status_code} {error['code']}: {error['message']} (field: {error['field']})")
        return response

    # 1. Wait for the finished task; its images come inline as base64.
    task = check(session.post(f"{url}/v1/generate", json={**TINY, "prompt": "a lighthouse at dawn", "seed": -1})).json()
    print("sync:", task["status"], "seed", task["seed"])
    save(task["images"][0]["base64"], f"sync_{task['id']}.png")

    # 2. Async: the task at once, then poll it.
    task = check(session.post(f"{url}/v1/generate", json={**TINY, "prompt": "a red barn", "async": True})).json()
    while task["status"] in ("pending", "running"):
        time.sleep(0.2)
        task = check(session.get(f"{url}/v1/tasks/{task['id']}")).json()
        print("async:", task["status"], task["progress"]["percent"], "%")
    image = check(session.get(url + task["images"][0]["url"])).content
    open(f"async_{task['id']}.png", "wb").write(image)

    # 3. Image bytes: ask for them with Accept; the task id comes in a header.
    response = check(session.post(f"{url}/v1/generate", json={**TINY, "prompt": "a cat"}, headers={"Accept": "image/jpeg"}))
    open(f"bytes_{response.headers['X-Task-Id']}.jpg", "wb").write(response.content)
    print("bytes:", len(response.content), "bytes of JPEG")

    # 4. A stream of progress events; the last carries the images.
    request = {**TINY, "prompt": "a forest in fog", "stream": True}
    with check(session.post(f"{url}/v1/generate", json=request, stream=True)) as response:
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            print("stream:", event["percent"], "%", event.get("message", ""))
            if event["images"]:
                save(event["images"][0]["base64"], f"stream_{event['task_id']}.png")

    # 5. Multipart: img2img with the image as a file, the other fields as text.
    with open(f"async_{task['id']}.png", "rb") as image:
        fields = {**{k: str(v) for k, v in TINY.items()}, "mode": "img2img", "prompt": "an oil painting", "denoise": "0.6"}
        task = check(session.post(f"{url}/v1/generate", data=fields, files={"image": image})).json()
    print("multipart img2img:", task["status"])

    # 6. List the tasks, newest first, and delete the ended ones with their files.
    listing = check(session.get(f"{url}/v1/tasks", params={"status": "succeeded", "limit": 10})).json()
    print("succeeded:", [t["id"] for t in listing["tasks"]])
    deleted = check(session.delete(f"{url}/v1/tasks", params={"start_at": "2000-01-01"})).json()
    print("deleted:", deleted)


def save(data, name):
    with open(name, "wb") as file:
        file.write(base64.b64decode(data))
    print("saved", name)


if __name__ == "__main__":
    main()
