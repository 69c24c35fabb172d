"""Code-generation evaluation: benchmark loaders, a process sandbox, pass@k scoring.

Submodules (imported on use; this package imports nothing so `import veomni` stays light):
  tasks    get_task(name, data_dir) -> Task with .problems and .score(samples)
  scoring  ScoreConfig, load_samples
  sandbox  SandboxConfig, run_program / run_job (fresh child process per program)
  metrics  pass_at_k, mean_pass_at_k
  data     data-directory resolution and file readers
CLI: eval/score.py. Docs: docs/evaluation.md.
"""
