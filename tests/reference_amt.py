"""A line-by-line reference port of the Anticipatory Music Transformer's data pipeline (TEST ONLY).

AMT (jthickstun/anticipation, Apache-2.0) is not on PyPI, so its logic is transcribed here,
kept as close to the original as Python allows (mido-based, list-based, np.random global), to
check amtrain's fast symusic/numpy pipeline id for id and to serve as the mido baseline of
tests/bench/bench_midi.py. Sources (read through the public repository):

  anticipation/config.py, convert.py, tokenize.py   commit 08a1a5d703549036f15bc64dd45c4b973054d253
  anticipation/vocab.py                             commit e1bbb9c1885dcaf008629f7c6206555b8c5eff3d
  anticipation/ops.py                               commit f349893a64c5c0f16ca2f560110adb3cb1fb9bfd
  ops.translate's OverflowError check              commit 056dfd4fcb349d76dda8570a5e29ab2cc38ec19b

Changes from the original, none of which alters a produced id:
  - `tokenize` takes MIDI paths (running `midi_to_compound` inline, as scripts/midi-preprocess.py
    does before it) and returns the sequences and stats instead of writing a file; no tqdm.
  - tokenize.py catches an OverflowError from ops.translate (a sequence spanning more than
    MAX_TIME) and drops that sequence; ops.translate at f349893 no longer raises it, which
    would silently emit time ids >= MAX_TIME (inside the DUR block). We keep the check from the
    056dfd4 version that tokenize.py's `except OverflowError` was written for.
"""

from __future__ import annotations

from collections import defaultdict

import mido
import numpy as np

# --- config.py ---------------------------------------------------------------------------
CONTEXT_SIZE = 1024
EVENT_SIZE = 3
M = 341
DELTA = 5
MAX_TIME_IN_SECONDS = 100
MAX_DURATION_IN_SECONDS = 10
TIME_RESOLUTION = 100
MAX_PITCH = 128
MAX_INSTR = 129
MAX_NOTE = MAX_PITCH * MAX_INSTR
MAX_INTERARRIVAL_IN_SECONDS = 10
COMPOUND_SIZE = 5
MAX_TRACK_INSTR = 16
MAX_TRACK_TIME_IN_SECONDS = 3600
MIN_TRACK_TIME_IN_SECONDS = 10
MIN_TRACK_EVENTS = 100
MAX_TIME = TIME_RESOLUTION * MAX_TIME_IN_SECONDS
MAX_DUR = TIME_RESOLUTION * MAX_DURATION_IN_SECONDS

# --- vocab.py ----------------------------------------------------------------------------
EVENT_OFFSET = 0
TIME_OFFSET = EVENT_OFFSET
DUR_OFFSET = TIME_OFFSET + MAX_TIME
NOTE_OFFSET = DUR_OFFSET + MAX_DUR
REST = NOTE_OFFSET + MAX_NOTE
CONTROL_OFFSET = NOTE_OFFSET + MAX_NOTE + 1
ATIME_OFFSET = CONTROL_OFFSET + 0
ADUR_OFFSET = ATIME_OFFSET + MAX_TIME
ANOTE_OFFSET = ADUR_OFFSET + MAX_DUR
SPECIAL_OFFSET = ANOTE_OFFSET + MAX_NOTE
SEPARATOR = SPECIAL_OFFSET
AUTOREGRESS = SPECIAL_OFFSET + 1
ANTICIPATE = SPECIAL_OFFSET + 2
VOCAB_SIZE = ANTICIPATE + 1


# --- convert.py --------------------------------------------------------------------------
def midi_to_compound(midifile, debug=False):
    if type(midifile) is str:
        midi = mido.MidiFile(midifile)
    else:
        midi = midifile

    tokens = []
    note_idx = 0
    open_notes = defaultdict(list)

    time = 0
    instruments = defaultdict(int)  # default to code 0 = piano
    for message in midi:
        time += message.time

        # sanity check: negative time?
        if message.time < 0:
            raise ValueError

        if message.type == 'program_change':
            instruments[message.channel] = message.program
        elif message.type in ['note_on', 'note_off']:
            # special case: channel 9 is drums!
            instr = 128 if message.channel == 9 else instruments[message.channel]

            if message.type == 'note_on' and message.velocity > 0:  # onset
                # time quantization
                time_in_ticks = round(TIME_RESOLUTION * time)

                # Our compound word is: (time, duration, note, instr, velocity)
                tokens.append(time_in_ticks)
                tokens.append(-1)  # placeholder (we'll fill this in later)
                tokens.append(message.note)
                tokens.append(instr)
                tokens.append(message.velocity)

                open_notes[(instr, message.note, message.channel)].append((note_idx, time))
                note_idx += 1
            else:  # offset
                try:
                    open_idx, onset_time = open_notes[(instr, message.note, message.channel)].pop(0)
                except IndexError:
                    pass
                else:
                    duration_ticks = round(TIME_RESOLUTION * (time - onset_time))
                    tokens[5 * open_idx + 1] = duration_ticks
    return tokens


def compound_to_events(tokens, stats=False):
    assert len(tokens) % 5 == 0
    tokens = tokens.copy()

    # remove velocities
    del tokens[4::5]

    # combine (note, instrument)
    assert all(-1 <= tok < 2**7 for tok in tokens[2::4])
    assert all(-1 <= tok < 129 for tok in tokens[3::4])
    tokens[2::4] = [SEPARATOR if note == -1 else MAX_PITCH * instr + note
                    for note, instr in zip(tokens[2::4], tokens[3::4], strict=True)]
    tokens[2::4] = [NOTE_OFFSET + tok for tok in tokens[2::4]]
    del tokens[3::4]

    # max duration cutoff and set unknown durations to 250ms
    truncations = sum([1 for tok in tokens[1::3] if tok >= MAX_DUR])
    tokens[1::3] = [TIME_RESOLUTION // 4 if tok == -1 else min(tok, MAX_DUR - 1)
                    for tok in tokens[1::3]]
    tokens[1::3] = [DUR_OFFSET + tok for tok in tokens[1::3]]

    assert min(tokens[0::3]) >= 0
    tokens[0::3] = [TIME_OFFSET + tok for tok in tokens[0::3]]

    assert len(tokens) % 3 == 0

    if stats:
        return tokens, truncations

    return tokens


def events_to_compound(tokens, debug=False):
    tokens = unpad(tokens)

    # move all tokens to zero-offset for synthesis
    tokens = [tok - CONTROL_OFFSET if tok >= CONTROL_OFFSET and tok != SEPARATOR else tok
              for tok in tokens]

    # remove type offsets
    tokens[0::3] = [tok - TIME_OFFSET if tok != SEPARATOR else tok for tok in tokens[0::3]]
    tokens[1::3] = [tok - DUR_OFFSET if tok != SEPARATOR else tok for tok in tokens[1::3]]
    tokens[2::3] = [tok - NOTE_OFFSET if tok != SEPARATOR else tok for tok in tokens[2::3]]

    offset = 0  # add max time from previous track for synthesis
    track_max = 0  # keep track of max time in track
    for j, (time, dur, note) in enumerate(zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True)):
        if note == SEPARATOR:
            offset += track_max
            track_max = 0
        else:
            track_max = max(track_max, time + dur)
            tokens[3 * j] += offset

    # strip sequence separators
    assert len([tok for tok in tokens if tok == SEPARATOR]) % 3 == 0
    tokens = [tok for tok in tokens if tok != SEPARATOR]

    assert len(tokens) % 3 == 0
    out = 5 * (len(tokens) // 3) * [0]
    out[0::5] = tokens[0::3]
    out[1::5] = tokens[1::3]
    out[2::5] = [tok - (2**7) * (tok // 2**7) for tok in tokens[2::3]]
    out[3::5] = [tok // 2**7 for tok in tokens[2::3]]
    out[4::5] = (len(tokens) // 3) * [72]  # default velocity
    return out


# --- ops.py ------------------------------------------------------------------------------
def pad(tokens, end_time=None, density=TIME_RESOLUTION):
    end_time = TIME_OFFSET + (end_time if end_time else max_time(tokens, seconds=False))
    new_tokens = []
    previous_time = TIME_OFFSET + 0
    for (time, dur, note) in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        # must pad before separation, anticipation
        assert note < CONTROL_OFFSET

        # insert pad tokens to ensure the desired density
        while time > previous_time + density:
            new_tokens.extend([previous_time + density, DUR_OFFSET + 0, REST])
            previous_time += density

        new_tokens.extend([time, dur, note])
        previous_time = time

    while end_time > previous_time + density:
        new_tokens.extend([previous_time + density, DUR_OFFSET + 0, REST])
        previous_time += density

    return new_tokens


def unpad(tokens):
    new_tokens = []
    for (time, dur, note) in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        if note == REST:
            continue
        new_tokens.extend([time, dur, note])
    return new_tokens


def anticipate(events, controls, delta=DELTA * TIME_RESOLUTION):
    if len(controls) == 0:
        return events, controls

    tokens = []
    event_time = 0
    control_time = controls[0] - ATIME_OFFSET
    for time, dur, note in zip(events[0::3], events[1::3], events[2::3], strict=True):
        while event_time >= control_time - delta:
            tokens.extend(controls[0:3])
            controls = controls[3:]  # consume this control
            control_time = controls[0] - ATIME_OFFSET if len(controls) > 0 else float('inf')

        assert note < CONTROL_OFFSET
        event_time = time - TIME_OFFSET
        tokens.extend([time, dur, note])

    return tokens, controls


def min_time(tokens, seconds=True, instr=None):
    mt = None
    for time, _dur, note in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        # stop calculating at sequence separator
        if note == SEPARATOR:
            break

        if note < CONTROL_OFFSET:
            time -= TIME_OFFSET
            note -= NOTE_OFFSET
        else:
            time -= ATIME_OFFSET
            note -= ANOTE_OFFSET

        if instr is not None and instr != note // 2**7:
            continue

        mt = time if mt is None else min(mt, time)

    if mt is None:
        mt = 0
    return mt / float(TIME_RESOLUTION) if seconds else mt


def max_time(tokens, seconds=True, instr=None):
    mt = 0
    for time, _dur, note in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        # stop calculating at sequence separator
        if note == SEPARATOR:
            break

        if note < CONTROL_OFFSET:
            time -= TIME_OFFSET
            note -= NOTE_OFFSET
        else:
            time -= ATIME_OFFSET
            note -= ANOTE_OFFSET

        if instr is not None and instr != note // 2**7:
            continue

        mt = max(mt, time)

    return mt / float(TIME_RESOLUTION) if seconds else mt


def get_instruments(tokens):
    instruments = defaultdict(int)
    for _time, _dur, note in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        if note >= SPECIAL_OFFSET:
            continue

        if note < CONTROL_OFFSET:
            note -= NOTE_OFFSET
        else:
            note -= ANOTE_OFFSET

        instr = note // 2**7
        instruments[instr] += 1

    return instruments


def translate(tokens, dt, seconds=False):
    if seconds:
        dt = int(TIME_RESOLUTION * dt)

    new_tokens = []
    for (time, dur, note) in zip(tokens[0::3], tokens[1::3], tokens[2::3], strict=True):
        # stop translating after EOT
        if note == SEPARATOR:
            new_tokens.extend([time, dur, note])
            dt = 0
            continue

        if note < CONTROL_OFFSET:
            this_time = time - TIME_OFFSET
        else:
            this_time = time - ATIME_OFFSET

        assert 0 <= this_time + dt
        if not this_time + dt < MAX_TIME:  # 056dfd4
            raise OverflowError

        new_tokens.extend([time + dt, dur, note])

    return new_tokens


# --- tokenize.py -------------------------------------------------------------------------
def extract_spans(all_events, rate):
    events = []
    controls = []
    span = True
    next_span = end_span = TIME_OFFSET + 0
    for time, dur, note in zip(all_events[0::3], all_events[1::3], all_events[2::3], strict=True):
        assert note not in [SEPARATOR, REST]  # shouldn't be in the sequence yet

        # end of an anticipated span; decide when to do it again (next_span)
        if span and time >= end_span:
            span = False
            next_span = time + int(TIME_RESOLUTION * np.random.exponential(1. / rate))

        # anticipate a 3-second span
        if (not span) and time >= next_span:
            span = True
            end_span = time + DELTA * TIME_RESOLUTION

        if span:
            # mark this event as a control
            controls.extend([CONTROL_OFFSET + time, CONTROL_OFFSET + dur, CONTROL_OFFSET + note])
        else:
            events.extend([time, dur, note])

    return events, controls


ANTICIPATION_RATES = 10


def extract_random(all_events, rate):
    events = []
    controls = []
    for time, dur, note in zip(all_events[0::3], all_events[1::3], all_events[2::3], strict=True):
        assert note not in [SEPARATOR, REST]  # shouldn't be in the sequence yet

        if np.random.random() < rate / float(ANTICIPATION_RATES):
            # mark this event as a control
            controls.extend([CONTROL_OFFSET + time, CONTROL_OFFSET + dur, CONTROL_OFFSET + note])
        else:
            events.extend([time, dur, note])

    return events, controls


def extract_instruments(all_events, instruments):
    events = []
    controls = []
    for time, dur, note in zip(all_events[0::3], all_events[1::3], all_events[2::3], strict=True):
        assert note < CONTROL_OFFSET  # shouldn't be in the sequence yet
        assert note not in [SEPARATOR, REST]  # these shouldn't either

        instr = (note - NOTE_OFFSET) // 2**7
        if instr in instruments:
            # mark this event as a control
            controls.extend([CONTROL_OFFSET + time, CONTROL_OFFSET + dur, CONTROL_OFFSET + note])
        else:
            events.extend([time, dur, note])

    return events, controls


def maybe_tokenize(compound_tokens):
    # skip sequences with very few events
    if len(compound_tokens) < COMPOUND_SIZE * MIN_TRACK_EVENTS:
        return None, None, 1  # short track

    events, truncations = compound_to_events(compound_tokens, stats=True)
    end_time = max_time(events, seconds=False)

    # don't want to deal with extremely short tracks
    if end_time < TIME_RESOLUTION * MIN_TRACK_TIME_IN_SECONDS:
        return None, None, 1  # short track

    # don't want to deal with extremely long tracks
    if end_time > TIME_RESOLUTION * MAX_TRACK_TIME_IN_SECONDS:
        return None, None, 2  # long track

    # skip sequences more instruments than MIDI channels (16)
    if len(get_instruments(events)) > MAX_TRACK_INSTR:
        return None, None, 3  # too many instruments

    return events, truncations, 0


def tokenize(midifiles, augment_factor):
    """tokenize.py `tokenize`, fed by midi_to_compound; returns (sequences, stats tuple)."""
    all_truncations = 0
    seqcount = rest_count = 0
    stats = 4 * [0]  # (short, long, too many instruments, inexpressible)
    np.random.seed(0)
    out = []

    concatenated_tokens = []
    for filename in midifiles:
        all_events, truncations, status = maybe_tokenize(midi_to_compound(str(filename)))

        if status > 0:
            stats[status - 1] += 1
            continue

        instruments = list(get_instruments(all_events).keys())
        end_time = max_time(all_events, seconds=False)

        # different random augmentations
        for k in range(augment_factor):
            if k % 10 == 0:
                # no augmentation
                events = all_events.copy()
                controls = []
            elif k % 10 == 1:
                # span augmentation
                lmbda = .05
                events, controls = extract_spans(all_events, lmbda)
            elif k % 10 < 6:
                # random augmentation
                r = np.random.randint(1, ANTICIPATION_RATES)
                events, controls = extract_random(all_events, r)
            else:
                if len(instruments) > 1:
                    # instrument augmentation: at least one, but not all instruments
                    u = 1 + np.random.randint(len(instruments) - 1)
                    subset = np.random.choice(instruments, u, replace=False)
                    events, controls = extract_instruments(all_events, subset)
                else:
                    # no augmentation
                    events = all_events.copy()
                    controls = []

            if len(concatenated_tokens) == 0:
                z = ANTICIPATE if k % 10 != 0 else AUTOREGRESS

            all_truncations += truncations
            events = pad(events, end_time)
            rest_count += sum(1 if tok == REST else 0 for tok in events[2::3])
            tokens, controls = anticipate(events, controls)
            assert len(controls) == 0  # should have consumed all controls (because of padding)
            tokens[0:0] = [SEPARATOR, SEPARATOR, SEPARATOR]
            concatenated_tokens.extend(tokens)

            # write out full sequences to file
            while len(concatenated_tokens) >= EVENT_SIZE * M:
                seq = concatenated_tokens[0:EVENT_SIZE * M]
                concatenated_tokens = concatenated_tokens[EVENT_SIZE * M:]

                try:
                    # relativize time to the sequence
                    seq = translate(seq, -min_time(seq, seconds=False), seconds=False)

                    # should have relativized to zero
                    assert min_time(seq, seconds=False) == 0
                except OverflowError:
                    # relativized time exceeds MAX_TIME
                    stats[3] += 1
                    continue

                # if seq contains SEPARATOR, global controls describe the first sequence
                seq.insert(0, z)

                out.append(seq)
                seqcount += 1

                # grab the current augmentation controls if we didn't already
                z = ANTICIPATE if k % 10 != 0 else AUTOREGRESS

    return out, (seqcount, rest_count, stats[0], stats[1], stats[2], stats[3], all_truncations)


def midi_to_events(midifile):
    """convert.py `midi_to_events`: the file's events (no filters), the mido baseline."""
    return compound_to_events(midi_to_compound(str(midifile)))
