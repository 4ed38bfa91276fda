-- A catalog written by imagefs 0.1 (schema 1), as 'sqlite3 catalog.db .dump' prints it.
-- Made with that release's CLI and daemon (http sources on a loopback test server): queued.iso
-- added with no daemon running, active.qcow2 imported, failed.img a 404, importing.img and
-- verifying.img held by the server when the daemon was killed (-9). verifying.img was then set
-- to 'verifying' by the statement 0.1's begin_verify runs, as a daemon killed during
-- verification leaves it. .dump does not carry the schema version, so it is set at the end.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE images (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: inode = id + 1
        name           TEXT NOT NULL UNIQUE,
        source         TEXT NOT NULL,
        source_kind    TEXT NOT NULL CHECK (source_kind IN ('http', 'file', 'upload')),
        state          TEXT NOT NULL
                       CHECK (state IN ('queued', 'importing', 'verifying', 'active', 'failed')),
        expected_size  INTEGER CHECK (expected_size IS NULL OR expected_size >= 0),
        bytes_imported INTEGER NOT NULL DEFAULT 0,
        final_size     INTEGER,
        sha256         TEXT,
        sha512         TEXT,
        expected_sha256 TEXT,
        expected_sha512 TEXT,
        format         TEXT,
        virtual_size   INTEGER,
        attempts       INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL,
        activated_at   INTEGER,
        import_token   INTEGER NOT NULL DEFAULT 0,
        CHECK (state != 'active' OR (final_size IS NOT NULL AND sha256 IS NOT NULL))
    );
INSERT INTO images VALUES(2,'active.qcow2','http://127.0.0.1:32875/disk.qcow2','http','active',196616,196616,196616,'1b7af784841125887e688254229e282829e17245d0e47fe7280da9b68a30d9e1',NULL,NULL,NULL,'qcow2',67108864,1,NULL,1796318526052,1796318526073,1796318526073,1);
INSERT INTO images VALUES(3,'failed.img','http://127.0.0.1:32875/missing.img','http','failed',NULL,0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,1,'HTTP 404 from http://127.0.0.1:32875/missing.img',1796318526324,1796318526350,NULL,1);
INSERT INTO images VALUES(4,'importing.img','http://127.0.0.1:32875/disk.img?gate=never','http','importing',200000,0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,1,NULL,1796318526555,1796318526586,NULL,1);
INSERT INTO images VALUES(5,'verifying.img','http://127.0.0.1:32875/disk.img?gate=never2','http','verifying',200000,200000,200000,NULL,NULL,NULL,NULL,NULL,NULL,1,NULL,1796318526607,1796318526636,NULL,1);
INSERT INTO images VALUES(6,'queued.iso','http://127.0.0.1:32875/disk.img','http','queued',NULL,0,NULL,NULL,NULL,'4a60441fee65a7942e6e047852543bb5bae601616411d26fb6f2ad2b0236d536',NULL,NULL,NULL,0,NULL,1796318527992,1796318527992,NULL,0);
DELETE FROM sqlite_sequence;
INSERT INTO sqlite_sequence VALUES('images',6);
COMMIT;
PRAGMA user_version = 1;
