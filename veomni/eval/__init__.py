"""Code-generation evaluation: benchmark loaders, a process sandbox, pass@k scoring.

Submodules (imported on use; this package imports nothing so `import veomni` stays light):
  tasks      get_task(name, data_dir) -> Task with .problems and .score(samples)
  scoring    ScoreConfig, load_samples
  candidate  run_check (HumanEval check(candidate) via a trusted tester), CandidateSession (evalplus)
  sandbox    SandboxConfig, describe_sandbox: the child processes and their limits
  compare    evalplus output comparison (in the scorer)
  metrics    pass_at_k, mean_pass_at_k
  data       data-directory resolution and file readers
CLI: eval/score.py. Docs: docs/evaluation.md.
"""
