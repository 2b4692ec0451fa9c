"""The experiment harness around the algorithm: a run's spec (`spec`), running it (`experiment`), the loop
(`trainer`), its logs and sinks (`logs`), its directory and signals (`run_dir`) and offline-to-online
fine-tuning (`online`). The algorithm (`vgf_prob.rl.agent`, `config`, `networks`) never imports from here."""
