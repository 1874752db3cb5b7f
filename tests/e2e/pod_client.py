"""Runs inside a simulated pod (its network namespace and cgroup): one chat with the
official ollama client, as an unmodified workload would make it, and prints what came
back as JSON: the model the LLM answered as, or the HTTP status of a refusal."""

import argparse
import json

import ollama

p = argparse.ArgumentParser()
p.add_argument("--host", required=True, help="the LLM server's URL as the workload knows it")
p.add_argument("--prompt", default="hi")
a = p.parse_args()

client = ollama.Client(host=a.host)
try:
    chat = client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": a.prompt}],
                       options={"num_predict": 5})
    print(json.dumps({"model": chat.model, "eval_count": chat.eval_count}))
except ollama.ResponseError as e:
    print(json.dumps({"status": e.status_code, "error": str(e)}))
