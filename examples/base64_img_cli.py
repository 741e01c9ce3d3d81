"""Send a local image inline as a base64 data: URL (no file access needed on the server side).

    python examples/base64_img_cli.py examples/house.png "What is in this picture?"
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path

from openai import OpenAI


def data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("prompt", nargs="?", default="Describe this image.")
    parser.add_argument("--base-url", default="http://localhost:9997/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model,
        max_tokens=args.max_tokens,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(args.image)}},
            {"type": "text", "text": args.prompt},
        ]}],
    )
    print(response.choices[0].message.content)
    print(f"[{response.choices[0].finish_reason}; {response.usage.prompt_tokens} prompt tokens]")


if __name__ == "__main__":
    main()
