"""RL with verifiable rewards: tasks, rollouts, the policy-gradient objective."""
