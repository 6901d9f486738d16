"""The `tokenization` stage wiring: dual SCIDs for users and items (Align3GR, stage 1)."""
from kedro.pipeline import Node, Pipeline

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import (
    assign_scids,
    embed_semantics,
    extract_cf_embeddings,
    report_quality,
    train_collaborative_encoder,
    train_sc_tokenizer,
)


def create_pipeline(**kwargs) -> Pipeline:
    embeddings = ["item_semantic_embeddings", "user_semantic_embeddings", "item_cf_embeddings", "user_cf_embeddings"]
    return stage_pipeline(
        "tokenization",
        [
            Node(
                embed_semantics,
                # train_sequences, valid: read only with semantic_encoder.item_features=lcrec_codes (user features
                # from their training-period items); the default (text) encodes items.text and users.profile.
                inputs=["items", "users", "params:tokenization", "train_sequences", "valid"],
                outputs=["item_semantic_embeddings", "user_semantic_embeddings"],
                name="embed_semantics",
            ),
            Node(
                train_collaborative_encoder,
                inputs=["items", "train_sequences", "valid", "params:tokenization", "params:seed"],
                outputs=["sasrec_model", "tokenization_sasrec_log"],
                name="train_collaborative_encoder",
            ),
            Node(
                extract_cf_embeddings,
                inputs=["sasrec_model", "items", "users", "train_sequences", "valid", "tokenization_sasrec_log"],
                outputs=["item_cf_embeddings", "user_cf_embeddings"],
                name="extract_cf_embeddings",
            ),
            Node(
                train_sc_tokenizer,
                inputs=[*embeddings, "train_sequences", "valid", "params:tokenization", "params:seed"],
                outputs=["sc_tokenizer", "tokenization_sc_log"],
                name="train_sc_tokenizer",
            ),
            Node(
                assign_scids,
                inputs=["sc_tokenizer", *embeddings, "params:tokenization"],
                outputs=["item_scids", "user_scids", "item_sc_embeddings", "user_sc_embeddings", "tokenization_scid_report"],
                name="assign_scids",
            ),
            Node(
                report_quality,
                inputs=["tokenization_scid_report", "tokenization_sasrec_log", "tokenization_sc_log", "params:tokenization"],
                outputs=["tokenization_quality", "tokenization_metrics", "codebook_usage_plot"],
                name="report_tokenization_quality",
            ),
        ],
    )
