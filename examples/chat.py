"""A multi-turn chat with a model served by a swarm: each turn sends only the new message.

    python examples/chat.py MODEL --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID

MODEL is the same checkpoint directory (or cached repo id) the servers serve; the client reads only
its embeddings, final norm, head and tokenizer from it.
"""

import argparse

from transformers import AutoTokenizer, TextStreamer

from swarm import AutoDistributedModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--max-length", type=int, default=2048, help="positions the conversation may hold")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoDistributedModel.from_pretrained(args.model, initial_peers=args.initial_peers)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        with model.inference_session(max_length=args.max_length):
            while message := input("you> ").strip():
                chat = [{"role": "user", "content": message}]
                inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                model.generate(inputs["input_ids"], max_new_tokens=256, streamer=streamer)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        model.remote.shutdown()


if __name__ == "__main__":
    main()
