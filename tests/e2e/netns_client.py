"""Runs inside a test network namespace: calls an LLM server with the official clients
from a given source address (the 'workload'), and prints what came back as JSON."""

import argparse
import json

import httpx
import ollama
import openai

p = argparse.ArgumentParser()
p.add_argument("--source", required=True, help="local address to connect from")
p.add_argument("--host", required=True, help="the LLM server's URL as the workload knows it")
a = p.parse_args()

transport = lambda: httpx.HTTPTransport(local_address=a.source)  # noqa: E731
ol = ollama.Client(host=a.host, transport=transport())
chat = ol.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}],
               options={"num_predict": 5})
oa = openai.OpenAI(base_url=f"{a.host}/v1", api_key="x", max_retries=0,
                   http_client=httpx.Client(transport=transport()))
comp = oa.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                  messages=[{"role": "user", "content": "hi"}])
print(json.dumps({"ollama_model": chat.model, "ollama_eval_count": chat.eval_count,
                  "openai_model": comp.model, "openai_tokens": comp.usage.completion_tokens}))
