-- Plant source schema of the `quality_vision` database (ARCHITECTURE.md section 4).
--
-- This is the plant's schema as the platform *reads* it. The simulator, the VOC
-- importer and the tests create it; in production the plant already runs it.
-- Idempotent: every statement can be re-applied.
--
-- Constraints are deliberately the ones a plant database really has (keys,
-- NOT NULL on keys): value rules (confidence 1-5, decision enum, sane boxes)
-- are enforced by the ingestion contracts (pandera), which quarantine bad rows
-- instead of losing them.
--
-- Every table has `updated_at`, maintained by a trigger on UPDATE, so that
-- ingestion can be incremental (CDC) on it.

CREATE SCHEMA IF NOT EXISTS inspection;
CREATE SCHEMA IF NOT EXISTS erp;

CREATE OR REPLACE FUNCTION inspection.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END;
$$;

-- ERP ---------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS erp.product_specs (
    part_type        text PRIMARY KEY,
    description      text,
    material         text,
    nominal_width_mm double precision,
    nominal_height_mm double precision,
    tolerance_mm     double precision,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS erp.production_orders (
    production_order_id text PRIMARY KEY,
    part_type        text NOT NULL,
    plant_id         text,
    line_id          text,
    quantity         integer,
    status           text,
    planned_start    timestamptz,
    due_date         date,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Inspection --------------------------------------------------------------

CREATE TABLE IF NOT EXISTS inspection.equipment_registry (
    machine_id       text PRIMARY KEY,
    plant_id         text NOT NULL,
    line_id          text NOT NULL,
    machine_type     text,
    commissioned_on  date,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS inspection.camera_calibration (
    camera_id        text NOT NULL,
    valid_from       timestamptz NOT NULL,
    line_id          text,
    machine_id       text,
    focal_length_mm  double precision,
    aperture_f       double precision,
    exposure_us      integer,
    gain_db          double precision,
    resolution_w     integer,
    resolution_h     integer,
    pixel_size_um    double precision,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (camera_id, valid_from)
);

CREATE TABLE IF NOT EXISTS inspection.image_metadata (
    image_id            uuid PRIMARY KEY,
    production_order_id text,
    machine_id          text,
    camera_id           text,
    line_id             text,
    capture_timestamp   timestamptz NOT NULL,
    image_path          text,
    part_type           text,
    exposure_settings   jsonb,
    width               integer,
    height              integer,
    source              text,
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS inspection.defect_annotations (
    annotation_id    uuid PRIMARY KEY,
    image_id         uuid NOT NULL REFERENCES inspection.image_metadata (image_id),
    defect_type      text,
    bounding_box     jsonb,
    annotator_id     text,
    confidence       integer,
    severity         text,
    annotated_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS inspection.inspection_results (
    result_id        uuid PRIMARY KEY,
    image_id         uuid NOT NULL REFERENCES inspection.image_metadata (image_id),
    inspector_id     text,
    decision         text,
    defect_codes     text[],
    inspected_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Written by serving and the line, read by monitoring (later stages).
CREATE TABLE IF NOT EXISTS inspection.predictions (
    prediction_id      uuid PRIMARY KEY,
    image_id           uuid,
    camera_id          text,
    model_version      text,
    is_shadow          boolean NOT NULL DEFAULT false,
    prediction         text,
    predicted_class    text,
    defects            jsonb,
    overall_confidence double precision,
    inference_time_ms  double precision,
    predicted_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Serving (issue 5): one request gives a production row and, in shadow mode, a shadow row
-- with the same request_id; the decision, action and full probability vector are kept so
-- shadow comparisons and monitoring need no replay.
ALTER TABLE inspection.predictions ADD COLUMN IF NOT EXISTS request_id uuid;
ALTER TABLE inspection.predictions ADD COLUMN IF NOT EXISTS recommended_action text;
ALTER TABLE inspection.predictions ADD COLUMN IF NOT EXISTS probabilities jsonb;

-- The human inspectors' queue: every HUMAN_REVIEW decision of the production model.
CREATE TABLE IF NOT EXISTS inspection.human_review_queue (
    review_id          uuid PRIMARY KEY,
    prediction_id      uuid NOT NULL,
    request_id         uuid,
    image_id           uuid,
    camera_id          text,
    model_version      text,
    predicted_class    text,
    overall_confidence double precision,
    defects            jsonb,
    probabilities      jsonb,
    image_path         text,
    status             text NOT NULL DEFAULT 'OPEN' CHECK (status IN ('OPEN', 'RESOLVED')),
    inspector_id       text,
    inspector_decision text,
    resolved_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS inspection.inspection_overrides (
    override_id        uuid PRIMARY KEY,
    image_id           uuid,
    model_prediction   text,
    inspector_decision text,
    inspector_id       text,
    override_timestamp timestamptz NOT NULL,
    model_version      text,
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Monitoring (issue 6): operator switches that serving reads (auto_pass_paused: a FAR alert
-- stops the model from passing parts on its own until a person resumes it), and the history
-- of fired alerts (one row per alert and window, so re-running an hour changes nothing).
CREATE TABLE IF NOT EXISTS inspection.serving_controls (
    control            text PRIMARY KEY,
    enabled            boolean NOT NULL,
    reason             text,
    set_by             text,
    set_at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS inspection.monitoring_alerts (
    alert              text NOT NULL,
    window_start       timestamptz NOT NULL,
    window_end         timestamptz NOT NULL,
    severity           text NOT NULL,
    value              double precision,
    threshold          double precision,
    message            text,
    notified_via       text[],
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (alert, window_start)
);

-- Indexes: CDC reads on updated_at; partitioned reads on capture time; joins on image_id.
CREATE INDEX IF NOT EXISTS product_specs_updated_at_idx ON erp.product_specs (updated_at);
CREATE INDEX IF NOT EXISTS production_orders_updated_at_idx ON erp.production_orders (updated_at);
CREATE INDEX IF NOT EXISTS equipment_registry_updated_at_idx ON inspection.equipment_registry (updated_at);
CREATE INDEX IF NOT EXISTS camera_calibration_updated_at_idx ON inspection.camera_calibration (updated_at);
CREATE INDEX IF NOT EXISTS image_metadata_updated_at_idx ON inspection.image_metadata (updated_at);
CREATE INDEX IF NOT EXISTS image_metadata_capture_ts_idx ON inspection.image_metadata (capture_timestamp);
CREATE INDEX IF NOT EXISTS defect_annotations_updated_at_idx ON inspection.defect_annotations (updated_at);
CREATE INDEX IF NOT EXISTS defect_annotations_image_id_idx ON inspection.defect_annotations (image_id);
CREATE INDEX IF NOT EXISTS inspection_results_updated_at_idx ON inspection.inspection_results (updated_at);
CREATE INDEX IF NOT EXISTS inspection_results_image_id_idx ON inspection.inspection_results (image_id);
CREATE INDEX IF NOT EXISTS inspection_results_inspected_at_idx ON inspection.inspection_results (inspected_at);
CREATE INDEX IF NOT EXISTS predictions_updated_at_idx ON inspection.predictions (updated_at);
CREATE INDEX IF NOT EXISTS predictions_predicted_at_idx ON inspection.predictions (predicted_at);
CREATE INDEX IF NOT EXISTS predictions_request_id_idx ON inspection.predictions (request_id);
CREATE INDEX IF NOT EXISTS human_review_queue_status_idx ON inspection.human_review_queue (status, created_at);
CREATE INDEX IF NOT EXISTS human_review_queue_updated_at_idx ON inspection.human_review_queue (updated_at);
CREATE INDEX IF NOT EXISTS inspection_overrides_updated_at_idx ON inspection.inspection_overrides (updated_at);
CREATE INDEX IF NOT EXISTS inspection_overrides_image_id_idx ON inspection.inspection_overrides (image_id);
CREATE INDEX IF NOT EXISTS inspection_overrides_ts_idx ON inspection.inspection_overrides (override_timestamp);
CREATE INDEX IF NOT EXISTS predictions_image_id_idx ON inspection.predictions (image_id);

-- updated_at triggers (CREATE OR REPLACE TRIGGER keeps this file idempotent).
CREATE OR REPLACE TRIGGER product_specs_touch BEFORE UPDATE ON erp.product_specs
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER production_orders_touch BEFORE UPDATE ON erp.production_orders
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER equipment_registry_touch BEFORE UPDATE ON inspection.equipment_registry
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER camera_calibration_touch BEFORE UPDATE ON inspection.camera_calibration
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER image_metadata_touch BEFORE UPDATE ON inspection.image_metadata
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER defect_annotations_touch BEFORE UPDATE ON inspection.defect_annotations
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER inspection_results_touch BEFORE UPDATE ON inspection.inspection_results
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER predictions_touch BEFORE UPDATE ON inspection.predictions
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER human_review_queue_touch BEFORE UPDATE ON inspection.human_review_queue
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER inspection_overrides_touch BEFORE UPDATE ON inspection.inspection_overrides
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER serving_controls_touch BEFORE UPDATE ON inspection.serving_controls
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
CREATE OR REPLACE TRIGGER monitoring_alerts_touch BEFORE UPDATE ON inspection.monitoring_alerts
    FOR EACH ROW EXECUTE FUNCTION inspection.touch_updated_at();
