-- A database made by migraine-node 0.1.0 (schema of commit e95ac37, before Alembic: create_all, no
-- alembic_version table): one series received, classified and delivered. tests/storage/test_migrations.py
-- upgrades it.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE series (
	series_instance_uid VARCHAR(64) NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16), 
	series_description VARCHAR(64), 
	series_number INTEGER, 
	calling_ae_title VARCHAR(16), 
	expected_instances INTEGER, 
	instances INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	reason TEXT, 
	version INTEGER NOT NULL, 
	first_received_at FLOAT NOT NULL, 
	last_received_at FLOAT NOT NULL, 
	completed_at FLOAT, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (series_instance_uid)
);
INSERT INTO series VALUES('1.2.826.0.1.3680043.8.498.1.1','1.2.826.0.1.3680043.8.498.1','MR','T1 3D',3,'SCANNER',3,3,'delivered','SR delivered to 1 destination(s)',1,1000.0,1002.0,1010.0,1014.0);
CREATE TABLE instance (
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	number_of_frames INTEGER NOT NULL, 
	instance_number INTEGER, 
	size_bytes INTEGER NOT NULL, 
	path VARCHAR(200) NOT NULL, 
	received_at FLOAT NOT NULL, 
	PRIMARY KEY (sop_instance_uid), 
	FOREIGN KEY(series_instance_uid) REFERENCES series (series_instance_uid)
);
INSERT INTO instance VALUES('1.2.826.0.1.3680043.8.498.1.1.1','1.2.826.0.1.3680043.8.498.1.1','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,1,1000,'1.2.826.0.1.3680043.8.498.1/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.1.1.1.dcm',1000.0);
INSERT INTO instance VALUES('1.2.826.0.1.3680043.8.498.1.1.2','1.2.826.0.1.3680043.8.498.1.1','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,2,1000,'1.2.826.0.1.3680043.8.498.1/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.1.1.2.dcm',1001.0);
INSERT INTO instance VALUES('1.2.826.0.1.3680043.8.498.1.1.3','1.2.826.0.1.3680043.8.498.1.1','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,3,1000,'1.2.826.0.1.3680043.8.498.1/1.2.826.0.1.3680043.8.498.1.1/1.2.826.0.1.3680043.8.498.1.1.3.dcm',1002.0);
CREATE TABLE job (
	id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	version INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	reason TEXT, 
	instances INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	not_before FLOAT, 
	probability FLOAT, 
	label VARCHAR(32), 
	model_id VARCHAR(128), 
	device VARCHAR(16), 
	synthetic BOOLEAN, 
	timings TEXT, 
	sr_sop_instance_uid VARCHAR(64), 
	sr_path VARCHAR(300), 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (series_instance_uid, version), 
	FOREIGN KEY(series_instance_uid) REFERENCES series (series_instance_uid)
);
INSERT INTO job VALUES(1,'1.2.826.0.1.3680043.8.498.1.1',1,'delivered','SR delivered to 1 destination(s)',3,1,NULL,0.69999999999999995559,'responder','demo','cpu',1,'{"infer": 10}','1.2.826.0.1.3680043.8.498.2.1','outbox/sr.dcm',1010.0,1014.0);
CREATE TABLE delivery (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT, 
	last_error TEXT, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES job (id)
);
INSERT INTO delivery VALUES(1,1,'pacs','sent',1,NULL,NULL,1014.0);
CREATE TABLE result_object (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	path VARCHAR(300) NOT NULL, 
	content_key VARCHAR(64) NOT NULL, 
	predecessor_sop_instance_uid VARCHAR(64), 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (job_id, kind), 
	FOREIGN KEY(job_id) REFERENCES job (id)
);
INSERT INTO result_object VALUES(1,1,'sr','1.2.840.10008.5.1.4.1.1.88.33','1.2.826.0.1.3680043.8.498.2','1.2.826.0.1.3680043.8.498.2.1','outbox/sr.dcm','kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk',NULL,1013.0);
CREATE TABLE transmission (
	id INTEGER NOT NULL, 
	delivery_id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	result_series_instance_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	status INTEGER NOT NULL, 
	sent_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(delivery_id) REFERENCES delivery (id), 
	FOREIGN KEY(job_id) REFERENCES job (id)
);
INSERT INTO transmission VALUES(1,1,1,'1.2.826.0.1.3680043.8.498.1.1','pacs','sr','1.2.840.10008.5.1.4.1.1.88.33','1.2.826.0.1.3680043.8.498.2','1.2.826.0.1.3680043.8.498.2.1',0,1014.0);
CREATE INDEX ix_series_study_instance_uid ON series (study_instance_uid);
CREATE INDEX ix_series_state ON series (state);
CREATE INDEX ix_instance_series_instance_uid ON instance (series_instance_uid);
CREATE INDEX ix_job_state ON job (state);
CREATE INDEX ix_job_series_instance_uid ON job (series_instance_uid);
CREATE INDEX ix_delivery_job_id ON delivery (job_id);
CREATE INDEX ix_delivery_state_next ON delivery (state, next_attempt_at);
CREATE INDEX ix_result_object_job_id ON result_object (job_id);
CREATE INDEX ix_result_object_sop_instance_uid ON result_object (sop_instance_uid);
CREATE INDEX ix_transmission_series_instance_uid ON transmission (series_instance_uid);
CREATE INDEX ix_transmission_delivery_id ON transmission (delivery_id);
CREATE INDEX ix_transmission_job_id ON transmission (job_id);
COMMIT;
