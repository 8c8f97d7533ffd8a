"""The papers' unseen-task locomotion benchmark: Cheetah-dir, Cheetah-vel and Ant-dir on MuJoCo."""
