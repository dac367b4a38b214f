# Placeholder: the engine image arrives with the operations issue.
FROM python:3.11-slim
