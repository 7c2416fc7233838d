"""BibTeX entries of the methods the objective terms implement (their ``citation``)."""

MRL = """
@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

MIPIC = """
@inproceedings{mipic2026,
    title={MIPIC: Matryoshka Representation Learning via Self-Distilled Intra-Relational Alignment and Progressive Information Chaining},
    booktitle={Findings of the Association for Computational Linguistics: ACL 2026},
    year={2026},
    eprint={2604.24374},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""

ESE = """
@misc{li20242d,
    title={2D Matryoshka Sentence Embeddings},
    author={Xianming Li and Zongxi Li and Jing Li and Haoran Xie and Qing Li},
    year={2024},
    eprint={2402.14776},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""

MIC = """
@misc{mic2026,
    title={MIC: Maximizing Informational Capacity in Adaptive Representations via Isotropic Subspace Alignment},
    year={2026},
    eprint={2605.29987},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

MTA = """
@misc{mta2026,
    title={Multi-Granular Trajectory Alignment for Knowledge Distillation of Sentence Encoders},
    year={2026},
    eprint={2605.01374},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""
