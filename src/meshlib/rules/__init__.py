"""Routing rules: the schema (model.py) and the client that follows the control plane (watcher.py)."""

from .model import RuleError, Rules, RulesValidationError, parse_rules, validate_rules

__all__ = ["RuleError", "Rules", "RulesValidationError", "parse_rules", "validate_rules"]
