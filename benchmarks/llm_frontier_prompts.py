"""The prompts of the LLM frontier benchmark (benchmarks/llm_frontier.py): mundane topics, so sentiment is open.

TRAIN prompts' samples fit the proxy reward model and fix the fluency gate; TEST prompts are held out. Each list
begins with the LLM demo's own prompts (`vgf_prob.llm.demo`) and adds more.
"""

from vgf_prob.llm.demo import TEST_PROMPTS as DEMO_TEST_PROMPTS
from vgf_prob.llm.demo import TRAIN_PROMPTS as DEMO_TRAIN_PROMPTS

TRAIN_PROMPTS = DEMO_TRAIN_PROMPTS + (
    "Write one sentence about filling in a tax form.",
    "Describe a supermarket on a Saturday in one sentence.",
    "Write one sentence about a power cut at home.",
    "Describe an old bicycle in one sentence.",
    "Write one sentence about a school reunion.",
    "Describe a hospital waiting room in one sentence.",
    "Write one sentence about moving house.",
    "Describe a winter evening in one sentence.",
)
TEST_PROMPTS = DEMO_TEST_PROMPTS + (
    "Write one sentence about a delayed flight.",
    "Describe a library in one sentence.",
    "Write one sentence about learning to cook.",
    "Describe a traffic jam in one sentence.",
    "Write one sentence about your phone's battery.",
    "Describe a garden in autumn in one sentence.",
    "Write one sentence about a job interview.",
    "Describe a crowded beach in one sentence.",
    "Write one sentence about assembling furniture.",
    "Describe a small village in one sentence.",
    "Write one sentence about a family dinner.",
    "Describe a parking garage in one sentence.",
    "Write one sentence about studying for an exam.",
    "Describe a street market in one sentence.",
    "Write one sentence about a broken umbrella.",
    "Describe a hotel room in one sentence.",
    "Write one sentence about a neighbour's party.",
    "Describe a laundromat at night in one sentence.",
)
