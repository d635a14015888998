"""Reading model metrics from Triton's Prometheus page."""

from tritonop.runtime.metrics import model_metric

PAGE = """# HELP tritonop_llm_steps_total Engine steps
# TYPE tritonop_llm_steps_total counter
tritonop_llm_steps_total{model="chat",instance="chat_0_0"} 30
tritonop_llm_steps_total{model="chat",instance="chat_0_1"} 12
tritonop_llm_steps_total{model="chatty",instance="chatty_0_0"} 5
tritonop_llm_running_sequences{model="chat",instance="chat_0_0"} 3
"""


def test_instances_of_a_model_add_up_and_other_models_do_not():
    assert model_metric(PAGE, "tritonop_llm_steps_total", "chat") == 42
    assert model_metric(PAGE, "tritonop_llm_steps_total", "chatty") == 5
    assert model_metric(PAGE, "tritonop_llm_running_sequences", "chat") == 3
    assert model_metric(PAGE, "tritonop_llm_waiting_requests", "chat") == 0
