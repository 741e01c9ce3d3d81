"""Ask the served model about an image URL with the official `openai` client (streams the answer).

    python examples/openai_cli.py --image-url file://$PWD/examples/house.png "Describe this image."
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Describe this image.")
    parser.add_argument("--image-url", action="append", default=[], help="file://, http(s):// or data: URL; repeatable")
    parser.add_argument("--base-url", default="http://localhost:9997/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    content = [{"type": "image_url", "image_url": {"url": url}} for url in args.image_url]
    content.append({"type": "text", "text": args.prompt})
    request = dict(model=model, messages=[{"role": "user", "content": content}], max_tokens=args.max_tokens,
                   temperature=args.temperature)
    if args.no_stream:
        response = client.chat.completions.create(**request)
        print(response.choices[0].message.content)
        print(f"[{response.choices[0].finish_reason}; usage: {response.usage.prompt_tokens} prompt + "
              f"{response.usage.completion_tokens} completion tokens]")
        return
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
