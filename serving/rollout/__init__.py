"""The A/B evaluator: always-valid test of canary vs stable, guardrails, promotion and rollback."""
