"""memopt.engine: the decode engine, one C call a token over memopt's weights as they are held."""

from memopt.engine.llama import ARCHITECTURES, Engine, engine_for

__all__ = ["ARCHITECTURES", "Engine", "engine_for"]
